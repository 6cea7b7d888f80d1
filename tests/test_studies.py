"""The road-map studies in experiments/: every job of every study composes and validates at both
scales, the cost estimate adds up, and the launch commands keep a study in one group."""

from __future__ import annotations

import pytest

from sectional_moe import studies
from sectional_moe.errors import ConfigError
from sectional_moe.sweeps import expand_sweep

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
    all_jobs = [set(j) for j in studies.load_study("e_sweep").jobs("cpu")]
    jobs = [j for j in all_jobs if not any(o.startswith("seed=") for o in j)]
    for e in (1, 2, 4, 8, 16):
        for routing in ("segment_fixed", "topk", "hash"):
            assert sum({"model=sectional", "model.sectional_every=2", f"experts={e}", f"routing={routing}"} <= j for j in jobs) == 1
        # the paper read literally (every layer sectional) as a reference line
        assert sum({"model=sectional", "model.sectional_every=1", f"experts={e}"} <= j for j in jobs) == 1
    assert sum("model=dense" in j for j in jobs) == 1  # the baseline once, not once per E
    assert sum("model=moe" in j for j in jobs) == 6
    # three reference points again from two more seeds: the noise level of the study
    reseeded = [j for j in all_jobs if any(o.startswith("seed=") for o in j)]
    assert len(reseeded) == 6 and {o for j in reseeded for o in j if o.startswith("seed=")} == {"seed=1", "seed=2"}


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
    assert len(cmds) == len(study.sweep_lines("cpu")) == 7
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


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("parallel", [2, 3])
def test_parallel_split_runs_exactly_the_same_jobs(name, parallel):
    """Splitting sweep lines for concurrent runs neither drops nor repeats a job."""
    study = studies.load_study(name)

    def job_set(cmds):
        jobs = [frozenset(job) for cmd in cmds for job in expand_sweep(cmd[5:])]
        assert len(jobs) == len(set(jobs))
        return set(jobs)

    assert job_set(studies.train_commands(study, "cpu", [], parallel)) == job_set(studies.train_commands(study, "cpu", []))


def test_split_sweep_line_cuts_the_longest_plain_list():
    parts = studies.split_sweep_line("model=sectional experts=1,2,4,8,16 routing=segment_fixed,topk", 2)
    assert parts == ["model=sectional experts=1,4,16 routing=segment_fixed,topk", "model=sectional experts=2,8 routing=segment_fixed,topk"]
    # interpolations and quoted values are never split; a line without a plain list stays whole
    line = "model=moe \"model.expert_d_ff='${smoe.div:${size.d_ff},${experts}}'\""
    assert studies.split_sweep_line(line, 2) == [line]
    assert studies.split_sweep_line("model=dense", 4) == ["model=dense"]


def test_parallel_defaults_to_every_core_on_cpu_and_one_on_gpu(monkeypatch):
    monkeypatch.setattr(studies.os, "cpu_count", lambda: 2)
    assert studies.resolve_parallel("auto", "cpu") == 2 and studies.resolve_parallel("auto", "gpu") == 1
    assert studies.resolve_parallel("3", "gpu") == 3
    assert studies.resolve_parallel("auto", "cpu", studies.load_study("cost_vs_e")) == 1  # it measures step time
    with pytest.raises(ConfigError):
        studies.resolve_parallel(0, "cpu")


def test_concurrent_sweeps_each_log_to_a_file_and_report_the_worst_exit_code(tmp_path, monkeypatch):
    import sys

    monkeypatch.delenv("OMP_NUM_THREADS")  # unset: each concurrent sweep gets one thread

    code = "import os, sys; print('threads', os.environ['OMP_NUM_THREADS']); sys.exit({})"
    cmds = [[sys.executable, "-c", code.format(rc), "x", "y"] for rc in (0, 3, 0)]
    assert studies._run_concurrently(cmds, 2, tmp_path / "logs") == 3
    logs = sorted((tmp_path / "logs").glob("sweep-*.log"))
    assert len(logs) == 3 and all(log.read_text().strip() == "threads 1" for log in logs)
