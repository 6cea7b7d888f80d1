"""The road-map studies in experiments/: every job of every study composes and validates at both
scales, the cost estimate adds up, and the launch commands keep a study in one group."""

from __future__ import annotations

import pytest

from sectional_moe import studies
from sectional_moe.errors import ConfigError

ALL = studies.study_names()
REQUIRED = {"e_sweep", "seq_reduction", "expert_attention", "slicemoe_check", "routing_law", "isoflop", "cost_vs_e"}


def test_every_road_map_study_exists_with_its_description():
    assert REQUIRED <= set(ALL)
    for name in ALL:
        s = studies.load_study(name)
        assert s.question.endswith("?") and s.hypothesis and s.read and s.metric
        assert {"cpu", "gpu"} <= set(s.scales)


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
@pytest.mark.parametrize("name", ALL)
def test_every_job_composes_and_validates(name, scale):
    study = studies.load_study(name)
    ends_only = scale == "gpu"  # every cpu job runs here, so all are checked; gpu: each sweep's ends
    rows = studies.dry_run(study, scale, peak_tflops=100.0, ends_only=ends_only)
    assert len(rows) == len(study.jobs(scale, ends_only)) > 0
    for row in rows:
        assert row["flops"] == pytest.approx(row["flops_per_token"] * row["tokens"])
        assert row["hours"] == pytest.approx(row["flops"] / (100e12 * studies.ASSUMED_MFU[scale] * row["devices"]) / 3600)
        assert row["params_total"] >= row["params_active"] > 0


def test_e_sweep_covers_the_road_map_grid():
    jobs = [set(j) for j in studies.load_study("e_sweep").jobs("cpu")]
    for e in (1, 2, 4, 8, 16):
        for routing in ("segment_fixed", "topk", "hash"):
            assert sum({"model=sectional", "model.sectional_every=2", f"experts={e}", f"routing={routing}"} <= j for j in jobs) == 1
        # the paper read literally (every layer sectional) as a reference line
        assert sum({"model=sectional", "model.sectional_every=1", f"experts={e}"} <= j for j in jobs) == 1
    assert sum("model=dense" in j for j in jobs) == 1  # the baseline once, not once per E
    assert sum("model=moe" in j for j in jobs) == 6


def test_slicemoe_check_is_parameter_matched():
    rows = studies.dry_run(studies.load_study("slicemoe_check"), "cpu", peak_tflops=1.0)
    by_e: dict[int, dict[str, int]] = {}
    for r in rows:
        if r["family"] != "dense":
            by_e.setdefault(r["experts"], {})[r["family"]] = r["params_total"]
    for e, p in by_e.items():
        assert abs(p["sectional"] - p["moe"]) / p["moe"] < 0.15, (e, p)


def test_commands_share_the_study_group_and_scale_overrides():
    study = studies.load_study("e_sweep")
    cmds = studies.train_commands(study, "cpu", ["hydra/launcher=slurm"])
    assert len(cmds) == len(study.sweep_lines("cpu")) == 4
    for cmd in cmds:
        assert cmd[2] == "-m" and "group=study-e_sweep-cpu" in cmd and "experiment=study_cpu" in cmd
        assert cmd[-1] == "hydra/launcher=slurm"


def test_unknown_study_or_scale_names_the_choices(capsys):
    with pytest.raises(ConfigError, match="use one of.*e_sweep"):
        studies.load_study("nope")
    with pytest.raises(ConfigError, match="no scale 'tpu'"):
        studies.load_study("e_sweep").jobs("tpu")
    assert studies.main(["dry-run", "nope"]) == 2
    assert "Error: study:" in capsys.readouterr().err
