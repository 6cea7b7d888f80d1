"""Theory of the sectional MoE: cost model, scaling laws, fitters, IsoFLOP analysis and a
compute-optimal planner.

Pure numpy / scipy / pandas (no torch). Importing the package is light: the names below are
loaded from their modules on first use (PEP 562), so ``python -m sectional_moe.theory --help``
does not pay for scipy and pandas.

* :mod:`~sectional_moe.theory.cost_model` — Sane 2025's cost model: A_trad, the reported
  reduction factors (literal, to falsify), the R1 reconstructions, S(E) and E_opt, exact block
  FLOPs via :mod:`sectional_moe.models.flops`, κ fitted from measured step times and its
  conversion to the planner's unit;
* :mod:`~sectional_moe.theory.laws` — registry of published laws and coefficient sets
  (Chinchilla/Epoch, Clark, fine-grained, Ludziejewski 2025, Zhao 2025, Wan 2026);
* :mod:`~sectional_moe.theory.fitting` — Huber/L-BFGS-B multi-start fits, VPNLS, Clark,
  bootstrap, extrapolation checks, drop rules, design checks and identifiability;
* :mod:`~sectional_moe.theory.isoflop` — Hoffmann's Approaches 1 and 2 and Wan-style allocation
  laws fitted on our own runs;
* :mod:`~sectional_moe.theory.corpora` — training-token counts of the data configs (with provenance);
* :mod:`~sectional_moe.theory.planner` — budget → configurations → Hydra sweep command;
* :mod:`~sectional_moe.theory.plots` — the ``--plot`` figures (matplotlib, loaded only there);
* ``python -m sectional_moe.theory cost | fit | isoflop | plan | laws`` — the command line.

Every formula's docstring says whether it is a paper's statement ([P]), a secondary source's
([S]), derived here ([D]) or our reconstruction ([I]).

Imports: nothing at import time; its modules import numpy/scipy/pandas, :mod:`sectional_moe.models`
(spec and FLOP counts, torch-free) and :mod:`sectional_moe.errors` — never torch, never the report.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "cost_model": (
        "EOpt", "KappaFit", "block_flops_comparison", "e_opt", "e_opt_closed_form", "e_opt_table", "fit_kappa", "kappa_in_macs",
        "qkv_cost_traditional", "r1_parallel_qkv_factor", "r1_qkv_cost_fraction", "r1_summed_qkv_factor", "reduction_table",
        "reported_attention_factor", "reported_qkv_factor", "savings",
    ),
    "fitting": (
        "DropRule", "FitResult", "Underdetermined", "apply_drop_rules", "bootstrap_chinchilla", "bootstrap_fit", "cross_validate",
        "extrapolation_eval", "extrapolation_metrics", "fit_chinchilla", "fit_clark", "fit_parametric", "fit_vpnls",
        "hoffmann_init_grid",
    ),
    "isoflop": ("IsoflopResult", "approach1_envelope", "isoflop_analysis"),
    "laws": ("LAWS", "Law", "chinchilla_frontier", "get_law", "wan_d_opt", "wan_m_opt", "zhao_optima"),
    "planner": ("Plan", "PlannedRun", "plan"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sectional_moe.theory' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sectional_moe.theory.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
