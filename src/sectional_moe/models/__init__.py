"""Model code: plain PyTorch, no Lightning, Hydra or W&B (readable, testable and benchmarkable alone).

* :mod:`~sectional_moe.models.spec` — :class:`ModelSpec` and the routing rules (torch-free);
* :mod:`~sectional_moe.models.flops` — analytic matmuls, FLOPs and parameter counts (torch-free);
* :mod:`~sectional_moe.models.lm` — the decoder LM of every family; :mod:`~.blocks` its shared
  layers; :mod:`~.moe` the token-routed FFN; :mod:`~.sectional` the sectional block;
* :mod:`~sectional_moe.models.routers`, :mod:`~.experts`, :mod:`~.kernels` — routing, the stacked
  experts, the grouped GEMM; :mod:`~.cache` — decode caches; :mod:`~.loss` — the training loss.

Imports nothing of ours above it (only :mod:`sectional_moe.errors`). ``build_model`` and
``LanguageModel`` are loaded on first use, so that ``models.spec`` and ``models.flops`` stay
importable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sectional_moe.models.spec import ModelSpec

if TYPE_CHECKING:
    from sectional_moe.models.lm import LanguageModel

__all__ = ["LanguageModel", "ModelSpec", "build_model"]


def build_model(spec: ModelSpec) -> "LanguageModel":
    """Build the language model of a validated :class:`ModelSpec`."""
    from sectional_moe.models.lm import LanguageModel

    return LanguageModel(spec.validate())


def __getattr__(name: str) -> Any:
    if name == "LanguageModel":
        from sectional_moe.models.lm import LanguageModel

        return LanguageModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
