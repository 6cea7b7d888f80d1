"""What a fit returns: :class:`FitResult` and :class:`BootstrapResult`, and the JSON conversion
every fitter's output goes through (NaN, ±inf and complex numbers become ``None``).

Owns: the result dataclasses, :func:`jsonable`, :func:`finite_or_none`.
Imports: numpy, pandas (nothing of ours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


def finite_or_none(x: Any) -> float | None:
    """A real finite float, or None (NaN, ±inf, complex, non-numbers)."""
    if isinstance(x, (complex, np.complexfloating)):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def jsonable(x: Any) -> Any:
    """Strict-JSON-safe copy: numpy scalars → Python, NaN/±inf/complex → None, tuples → lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating, complex, np.complexfloating)):
        return finite_or_none(x)
    if x is None or isinstance(x, str):
        return x
    if x is pd.NA:
        return None
    return str(x)


@dataclass
class BootstrapResult:
    """Bootstrap refits: one row of ``samples`` per resample (NaN rows for failed refits)."""

    samples: pd.DataFrame
    se: dict[str, float]
    ci_low: dict[str, float]
    ci_high: dict[str, float]
    cov: pd.DataFrame
    settings: dict[str, Any]
    n_failed: int = 0
    failures: list[str] = field(default_factory=list)  # the distinct reasons refits failed (first few)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "se": self.se,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n_resamples": int(len(self.samples)),
            "n_failed": int(self.n_failed),
            "failures": self.failures,
            "settings": self.settings,
        })


@dataclass
class FitResult:
    """Result of a fit: full-precision parameters, objective, every start, residuals, flags.

    ``identified`` is False when the data do not determine the parameters (see
    :mod:`~sectional_moe.theory.fitting.identify`); ``identifiability`` holds the evidence (rank and
    condition number of the model's Jacobian, relative standard errors, parameters at a bound) and
    the reasons. A fit that is not identified is still returned (its numbers show *how* it fails)
    but every consumer must print the mark next to it.
    """

    law: str
    params: dict[str, float]
    objective: float
    success: bool
    message: str
    n_points: int
    starts: pd.DataFrame
    residuals: np.ndarray
    settings: dict[str, Any]
    derived: dict[str, float | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bootstrap: BootstrapResult | None = None
    dropped: pd.DataFrame | None = None
    identified: bool = True
    identifiability: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, include_starts: bool = False) -> dict[str, Any]:
        """JSON-safe summary (``include_starts`` adds the per-start table)."""
        out: dict[str, Any] = {
            "law": self.law,
            "params": self.params,
            "derived": self.derived,
            "identified": self.identified,
            "identifiability": self.identifiability,
            "objective": self.objective,
            "success": self.success,
            "message": self.message,
            "n_points": self.n_points,
            "n_starts": int(len(self.starts)),
            "n_starts_at_best": int(self.settings.get("n_starts_at_best", 0)),
            "settings": self.settings,
            "warnings": list(self.warnings),
        }
        if self.bootstrap is not None:
            out["bootstrap"] = self.bootstrap.to_dict()
        if self.dropped is not None:
            out["dropped"] = self.dropped.to_dict(orient="records")
        if include_starts:
            out["starts"] = self.starts.to_dict(orient="records")
        return jsonable(out)
