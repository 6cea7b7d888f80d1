"""The road-map studies as data: ``experiments/<name>.yaml`` read into :class:`Study`.

A study file holds the question, the hypothesis, the metric and how to read it, a list of
``sweeps`` (each one ``python train.py -m ...`` multirun, because Hydra's basic sweeper only
makes cartesian products and a dense baseline must not be repeated for every E) and ``scales``
(the overrides of each scale, normally ``experiment=study_cpu`` or ``experiment=study_gpu``).

Imports: omegaconf, :mod:`sectional_moe.cluster.sweeps` (torch-free).
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from omegaconf import OmegaConf

from sectional_moe.cluster.sweeps import expand_sweep
from sectional_moe.errors import ConfigError
from sectional_moe.files import STUDIES_DIR


@dataclasses.dataclass(frozen=True)
class TunePoint:
    """One tuning sweep: a family (and E) trained at every value of the tuned key."""

    name: str
    train: list[str]  # the overrides of its jobs (besides the scale's and the stage's)
    applies_to: list[str]  # a main sweep line holding all of these overrides uses this point's winner


@dataclasses.dataclass(frozen=True)
class TuneStage:
    """A study's tuning stage: ``param`` over ``values`` per point, at a short budget, before the sweeps.

    The winner of each point (lowest best validation loss, averaged over the stage's seeds) is
    appended to the main sweep lines it applies to; the jobs live in a sweep directory shared by
    every study of the scale (``group``), so studies that tune the same points reuse each other's runs.
    """

    param: str
    values: list[Any]
    overrides: dict[str, list[str]]  # scale ("*" for every scale) -> e.g. the short budget [trainer.max_steps=500]
    points: list[TunePoint]
    seeds: dict[str, list[int]] = dataclasses.field(default_factory=lambda: {"*": [0]})  # scale -> the seeds of each value
    group: str = "tune"

    def seeds_for(self, scale: str) -> list[int]:
        return self.seeds.get(scale, self.seeds.get("*", [0]))

    def line(self, point: TunePoint, scale: str) -> str:
        """The ``train.py -m`` line of one point's tuning sweep at ``scale``."""
        values = ",".join(str(v) for v in self.values)
        budget = self.overrides.get(scale, self.overrides.get("*", []))
        seeds = ",".join(str(s) for s in self.seeds_for(scale))
        return shlex.join([*point.train, *budget, f"{self.param}={values}", f"seed={seeds}"])

    def point_for(self, line: str) -> TunePoint | None:
        """The first point whose ``applies_to`` overrides all appear in a sweep line."""
        tokens = set(shlex.split(line))
        return next((p for p in self.points if set(p.applies_to) <= tokens), None)


TUNING_DIR = STUDIES_DIR / "tuning"  # shared tuning stages: a study's `tune: <name>` reads tuning/<name>.yaml


def _tune_stage(raw: Any, path: Any) -> TuneStage | None:
    """A study's ``tune``: a shared stage's name, ``{base: <name>, points: {...}}`` (its own points
    first, then the shared ones), or a whole stage inline."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"base": raw}
    if "base" in raw:
        base_path = TUNING_DIR / f"{raw['base']}.yaml"
        if not base_path.is_file():
            known = sorted(p.stem for p in TUNING_DIR.glob("*.yaml"))
            raise ConfigError("tune", f"{path}: no tuning stage {raw['base']!r} in {TUNING_DIR}; use one of {', '.join(known)}")
        base = OmegaConf.to_container(OmegaConf.load(base_path), resolve=False)
        assert isinstance(base, dict)
        raw = {**base, **{k: v for k, v in raw.items() if k not in ("base", "points")},
               "points": {**(raw.get("points") or {}), **base.get("points", {})}}
    missing = {"param", "values", "points"} - set(raw)
    if missing:
        raise ConfigError("tune", f"{path}: the tune stage lacks {sorted(missing)}")
    points = []
    for name, point in raw["points"].items():
        if "train" not in point:
            raise ConfigError(f"tune.points.{name}", f"{path}: give its train overrides (and applies_to)")
        points.append(TunePoint(str(name), [str(o) for o in point["train"]], [str(o) for o in point.get("applies_to", [])]))
    if len(raw["values"]) < 2:
        raise ConfigError("tune.values", f"{path}: tune.values needs at least two values to choose from")
    overrides = raw.get("overrides") or []
    overrides = overrides if isinstance(overrides, dict) else {"*": overrides}
    return TuneStage(param=str(raw["param"]), values=list(raw["values"]),
                     overrides={str(k): [str(o) for o in v] for k, v in overrides.items()},
                     points=points, seeds=_tune_seeds(raw, path), group=str(raw.get("group", "tune")))


def _tune_seeds(raw: dict[str, Any], path: Any) -> dict[str, list[int]]:
    """``seed: 0`` (one seed), ``seeds: 2`` (seeds 0 and 1), ``seeds: [0, 1]``, or any of these per
    scale (``seeds: {cpu: 1, gpu: 2}``) -> scale ("*" for every scale) -> the seeds."""
    if "seeds" not in raw:
        return {"*": [int(raw.get("seed", 0))]}
    by_scale = raw["seeds"] if isinstance(raw["seeds"], dict) else {"*": raw["seeds"]}
    out = {}
    for scale, value in by_scale.items():
        seeds = list(range(value)) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ConfigError("tune.seeds", f"{path}: tune.seeds={value!r}; give a count >= 1, a list of seeds, "
                                            "or either per scale ({cpu: 1, gpu: 2})")
        out[str(scale)] = [int(s) for s in seeds]
    return out


@dataclasses.dataclass
class Study:
    """One road-map study as written in ``experiments/<name>.yaml``."""

    name: str
    question: str
    hypothesis: str
    metric: str
    read: str
    sweeps: dict[str, list[str]]  # scale -> sweep lines ("*" for every scale)
    scales: dict[str, list[str]]
    report: dict[str, Any]
    parallel: int | None = None  # concurrent sweeps on the cpu scale (None: one per core); 1 for timing studies
    seeds: int = 1  # every sweep line without its own seed= runs seeds 0..seeds-1 (replicates)
    tune: TuneStage | None = None

    def group(self, scale: str) -> str:
        return f"study-{self.name}-{scale}"

    def scale_overrides(self, scale: str) -> list[str]:
        if scale not in self.scales:
            raise ConfigError("scale", f"study {self.name!r} has no scale {scale!r}; use one of {sorted(self.scales)}")
        return list(self.scales[scale])

    def tune_group(self, scale: str) -> str:
        """The sweep directory and W&B group of the tuning jobs (shared by the studies of a scale)."""
        assert self.tune is not None
        return f"study-{self.tune.group}-{scale}"

    def sweep_lines(self, scale: str, tuned: dict[str, Any] | None = None) -> list[str]:
        """The sweeps run at ``scale`` (its own list if the study has one, else the shared one),
        with the seed replicates and, given ``tuned`` (point name -> winner), the tuned value."""
        lines = []
        for line in self.sweeps.get(scale, self.sweeps.get("*", [])):
            keys = {t.split("=", 1)[0].lstrip("+~") for t in shlex.split(line)}
            if self.seeds > 1 and "seed" not in keys:
                line = f"{line} seed={','.join(str(s) for s in range(self.seeds))}"
            if tuned and self.tune is not None and self.tune.param not in keys:
                point = self.tune.point_for(line)
                if point is not None and point.name in tuned:
                    line = f"{line} {self.tune.param}={tuned[point.name]}"
            lines.append(line)
        return lines

    def jobs(self, scale: str, ends_only: bool = False) -> list[list[str]]:
        """Every job's overrides (scale first, then the sweep's), in launch order; with
        ``ends_only`` just the first and last job of each sweep (a quick structural check)."""
        base = self.scale_overrides(scale)
        out: list[list[str]] = []
        for sweep in self.sweep_lines(scale):
            jobs = expand_sweep(shlex.split(sweep))
            out += [base + job for job in (jobs[:1] + jobs[-1:] if ends_only and len(jobs) > 1 else jobs)]
        return out


#: the road map's order for ``run all``: the main question first, the serial timing study last
ROAD_MAP = ("e_sweep", "pre_expert_variants", "seq_reduction", "expert_attention", "slicemoe_check", "isoflop",
            "routing_law", "cost_vs_e")


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def road_map_order(names: list[str]) -> list[str]:
    """``["all"]`` -> every study, road-map order first, then any other in name order; else ``names``."""
    if names != ["all"]:
        return names
    known = study_names()
    return [n for n in ROAD_MAP if n in known] + [n for n in known if n not in ROAD_MAP]


def load_study(name: str) -> Study:
    """Read ``experiments/<name>.yaml``; a missing study names the ones that exist."""
    path = STUDIES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("study", f"no study {name!r} in {STUDIES_DIR}; use one of {', '.join(study_names())}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # ${...} belong to the jobs
    assert isinstance(raw, dict)
    missing = {"question", "hypothesis", "metric", "read", "sweeps", "scales"} - set(raw)
    if missing:
        raise ConfigError("study", f"{path} lacks {sorted(missing)}")
    return Study(name=name, question=raw["question"].strip(), hypothesis=raw["hypothesis"].strip(),
                 metric=raw["metric"], read=raw["read"].strip(),
                 sweeps=raw["sweeps"] if isinstance(raw["sweeps"], dict) else {"*": list(raw["sweeps"])},
                 scales={k: list(v) for k, v in raw["scales"].items()}, report=dict(raw.get("report") or {}),
                 parallel=raw.get("parallel"), seeds=_seeds(raw.get("seeds", 1), path), tune=_tune_stage(raw.get("tune"), path))


def _seeds(value: Any, path: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError("seeds", f"{path}: seeds={value!r} must be a whole number >= 1 (replicates per sweep job)")
    return value
