"""Model code: plain PyTorch, no Lightning, Hydra or W&B (readable, testable and benchmarkable alone)."""

from sectional_moe.models.lm import LanguageModel
from sectional_moe.spec import ModelSpec


def build_model(spec: ModelSpec) -> LanguageModel:
    """Build the language model of a validated :class:`ModelSpec`."""
    return LanguageModel(spec.validate())


__all__ = ["LanguageModel", "ModelSpec", "build_model"]
