"""What the benchmark measures: model configurations (a size preset, a family/routing, E), composed as
train.py composes them, and the *setups* each is trained in (precision, eager or compiled).

Imports: omegaconf, :mod:`sectional_moe.models.spec`, :mod:`sectional_moe.files` (torch-free).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from omegaconf import OmegaConf

from sectional_moe.files import CONF_DIR
from sectional_moe.models.spec import ModelSpec, spec_from_config

# family-routing combinations benchmarked (dense has no experts)
FAMILY_ROUTINGS: tuple[tuple[str, str | None], ...] = (
    ("dense", None), ("moe", "topk"), ("moe", "hash"),
    ("sectional", "segment_fixed"), ("sectional", "topk"), ("sectional", "hash"),
)
# per-preset batch size (sequences per step) unless --batch-size is given
DEFAULT_BATCH = {"nano": 2, "tiny": 8, "small": 4, "base": 8, "medium": 8, "large": 4}
# training setups: precision (Lightning string) and torch.compile; "+compile" may follow either precision
SETUP_PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
# the issue-17 reference shape: our dense model against a GPT-2-style model of equal FLOPs
REFERENCE_SHAPE = {"preset": "small", "n_layers": 4, "batch": 8, "vocab_size": 8192}
# the studies' own job shape (conf/experiment/<name>.yaml) and its study points, one per family
STUDY_EXPERIMENT = "study_cpu"
STUDY_POINTS: tuple[tuple[str, str | None, int | None], ...] = (
    ("dense", None, None), ("moe", "topk", 8), ("sectional", "segment_fixed", 4),
)


@dataclass(frozen=True)
class Setup:
    """How a case is trained: ``fp32`` | ``bf16``, optionally ``+compile`` (Inductor)."""

    name: str

    @property
    def precision(self) -> str:
        return SETUP_PRECISIONS[self.name.split("+")[0]]

    @property
    def compile(self) -> bool:
        return self.name.endswith("+compile")

    @property
    def dtype_name(self) -> str:
        """The matmul dtype of the setup: what its GEMM probe times."""
        return self.name.split("+")[0]


def parse_setups(items: Sequence[str]) -> list[Setup]:
    """``fp32 bf16 bf16+compile`` -> setups, validated (one line on a bad name)."""
    known = [p + c for p in SETUP_PRECISIONS for c in ("", "+compile")]
    out = []
    for item in items:
        if item not in known:
            raise SystemExit(f"error: unknown setup {item!r}; use any of {known}")
        out.append(Setup(item))
    return out


@dataclass(frozen=True)
class Case:
    """One model configuration: a size preset, a family/routing and E."""

    preset: str
    family: str
    routing: str | None
    experts: int | None
    spec: ModelSpec = field(compare=False, hash=False)
    size_overrides: tuple[tuple[str, int], ...] = ()  # scaling sweeps: (("seq_len", 512), ...)
    batch: int | None = None  # sequences per step when the case fixes it (study and reference shapes)
    tag: str | None = None  # a named shape ("study_cpu", "reference") instead of preset + overrides

    @property
    def group(self) -> str:
        """Preset plus any swept size keys (or the shape's tag): the unit inside which ratios to dense are taken."""
        if self.tag:
            return self.tag
        if not self.size_overrides:
            return self.preset
        return self.preset + "@" + ",".join(f"{k}={v}" for k, v in self.size_overrides)

    @property
    def name(self) -> str:
        if self.family == "dense":
            return f"{self.group}/dense"
        return f"{self.group}/{self.family}-{self.routing}-E{self.experts}"

    @property
    def label(self) -> str:
        """Short label without the preset (table rows)."""
        return self.name.split("/", 1)[1]


def load_size(preset: str) -> dict[str, Any]:
    """The ``conf/size/<preset>.yaml`` preset as a plain dict (the one ``train.py`` uses)."""
    path = CONF_DIR / "size" / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "size").glob("*.yaml"))
        raise SystemExit(f"error: unknown size preset {preset!r}; use one of {known}")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def make_spec(preset: str, family: str, routing: str | None, experts: int | None, vocab_size: int,
              size_overrides: dict[str, int] | None = None) -> ModelSpec:
    """Spec of a configuration, composed exactly as ``train.py`` composes it (size + model + routing).

    ``size_overrides`` replace preset keys (sweeps); a new ``d_model`` scales ``d_ff`` with it, so the
    FFN keeps the preset's width ratio.
    """
    model = dict(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{family}.yaml"), resolve=True))  # type: ignore[arg-type]
    model.pop("defaults", None)
    routing_cfg: dict[str, Any] = {"name": None}
    if routing is not None:
        routing_cfg = dict(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "routing" / f"{routing}.yaml"), resolve=True))  # type: ignore[arg-type]
    size = load_size(preset)
    for key, value in (size_overrides or {}).items():
        if key == "d_model":
            size["d_ff"] = int(round(size["d_ff"] * value / size["d_model"]))
        size[key] = value
    cfg = {"size": size, "model": model, "routing": routing_cfg, "experts": experts,
           "data": {"vocab_size": vocab_size}}
    return spec_from_config(cfg, vocab_size=vocab_size)


def build_cases(presets: Sequence[str], experts: Sequence[int], combos: Sequence[tuple[str, str | None]],
                vocab_size: int, seq_lens: Sequence[int] = (), d_models: Sequence[int] = ()) -> list[Case]:
    """Every (preset, seq_len, d_model, family/routing, E) combination (``seq_lens``/``d_models``
    empty: the preset's own); configurations a size cannot hold are skipped with a message."""
    cases = []
    for preset in presets:
        for seq_len in (seq_lens or [None]):
            for d_model in (d_models or [None]):
                over = tuple((k, v) for k, v in (("seq_len", seq_len), ("d_model", d_model)) if v is not None)
                for family, routing in combos:
                    for e in ([None] if family == "dense" else experts):
                        try:
                            spec = make_spec(preset, family, routing, e, vocab_size, dict(over))
                        except Exception as err:  # noqa: BLE001 - e.g. E not dividing the preset's heads
                            print(f"skip {preset}{dict(over) or ''}/{family}-{routing}-E{e}: {err}", file=sys.stderr)
                            continue
                        cases.append(Case(preset, family, routing, e, spec, over))
    return cases


def experiment_shape(name: str = STUDY_EXPERIMENT) -> tuple[str, int, int]:
    """(size preset, vocabulary, batch size) of ``conf/experiment/<name>.yaml``: the shape its jobs train at."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml"), resolve=True)
    assert isinstance(cfg, dict)
    preset = "tiny"
    for entry in cfg.get("defaults") or []:
        if isinstance(entry, dict):
            preset = entry.get("override /size", preset)
    data = cfg.get("data") or {}
    return str(preset), int(data["vocab_size"]), int(data["batch_size"])


def study_cases(name: str = STUDY_EXPERIMENT) -> list[Case]:
    """One study point per family at the studies' job shape (e_sweep's seed-noise points)."""
    preset, vocab, batch = experiment_shape(name)
    return [Case(preset, f, r, e, make_spec(preset, f, r, e, vocab), batch=batch, tag=name) for f, r, e in STUDY_POINTS]


def reference_case(quick: bool = False) -> Case:
    """Our dense model at :data:`REFERENCE_SHAPE` (its bare loop is held against the GPT-2-style
    reference); ``quick``: the nano preset, a smoke test of the same path."""
    shape = {"preset": "nano", "n_layers": 2, "batch": 2, "vocab_size": 512} if quick else REFERENCE_SHAPE
    spec = make_spec(shape["preset"], "dense", None, None, shape["vocab_size"], {"n_layers": shape["n_layers"]})
    return Case(shape["preset"], "dense", None, None, spec, batch=shape["batch"], tag="reference")


def parse_combos(items: Sequence[str]) -> list[tuple[str, str | None]]:
    """``dense moe-topk sectional-hash`` -> [(family, routing)], validated against the known pairs."""
    known = {(f if r is None else f"{f}-{r}"): (f, r) for f, r in FAMILY_ROUTINGS}
    out = []
    for item in items:
        if item not in known:
            raise SystemExit(f"error: unknown configuration {item!r}; use any of {sorted(known)}")
        out.append(known[item])
    return out
