"""The road-map studies in experiments/: every job of every study composes and validates at both
scales, the cost estimate adds up, and the launch commands keep a study in one group."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest

from sectional_moe.studies import catalog, cli, runner
from sectional_moe.errors import ConfigError
from sectional_moe.cluster.sweeps import expand_sweep

ALL = catalog.study_names()
REQUIRED = {"e_sweep", "seq_reduction", "expert_attention", "slicemoe_check", "routing_law", "isoflop", "cost_vs_e"}


def test_every_road_map_study_exists_with_its_description():
    assert REQUIRED <= set(ALL)
    for name in ALL:
        s = catalog.load_study(name)
        assert s.question.endswith("?") and s.hypothesis and s.read and s.metric
        assert {"cpu", "gpu"} <= set(s.scales)


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
@pytest.mark.parametrize("name", ALL)
def test_every_job_composes_and_validates(name, scale):
    # seeds change nothing a dry run checks, and the shared tuning stage has its own test: one
    # replicate per configuration and the main stage keep this test fast
    study = dataclasses.replace(catalog.load_study(name), seeds=1, tune=None)
    ends_only = scale == "gpu"  # every cpu job runs here, so all are checked; gpu: each sweep's ends
    rows = runner.dry_run(study, scale, peak_tflops=100.0, ends_only=ends_only)
    assert len(rows) == len(study.jobs(scale, ends_only)) > 0 and {r["stage"] for r in rows} == {"main"}
    for row in rows:
        assert row["flops"] == pytest.approx(row["flops_per_token"] * row["tokens"])
        assert row["hours"] == pytest.approx(row["flops"] / (100e12 * runner.ASSUMED_MFU[scale] * row["devices"]) / 3600)
        assert row["params_total"] >= row["params_active"] > 0


def test_e_sweep_covers_the_road_map_grid():
    all_jobs = [set(j) for j in catalog.load_study("e_sweep").jobs("cpu")]
    jobs = [j for j in all_jobs if "seed=0" in j]
    assert len(all_jobs) == 3 * len(jobs)  # every point from seeds 0, 1 and 2
    for e in (1, 2, 4, 8, 16):
        for routing in ("segment_fixed", "topk", "hash"):
            assert sum({"model=sectional", "model.sectional_every=2", f"experts={e}", f"routing={routing}"} <= j for j in jobs) == 1
        # the paper read literally (every layer sectional) as a reference line
        assert sum({"model=sectional", "model.sectional_every=1", f"experts={e}"} <= j for j in jobs) == 1
    assert sum("model=dense" in j for j in jobs) == 1  # the baseline once, not once per E
    assert sum("model=moe" in j for j in jobs) == 6
    # the alternating E = 16 points train at the value tuned at E = 16, the others at the family's
    study = catalog.load_study("e_sweep")
    tuned = {"dense": "0.007", "moe": "0.0035", "sectional-E16": "0.005", "sectional": "0.007"}
    lines = [" ".join(c) for c in runner.train_commands(study, "cpu", [], tuned=tuned)]
    e16 = [c for c in lines if "model.sectional_every=2" in c and "experts=16 " in c]
    rest = [c for c in lines if "model=sectional" in c and c not in e16]
    assert len(e16) == 1 and "optim.lr=0.005" in e16[0]
    assert rest and all("optim.lr=0.007" in c for c in rest)


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_tuning_job_composes_validates_and_is_costed_as_its_own_stage(scale):
    study = dataclasses.replace(catalog.load_study("pre_expert_variants"), seeds=1)  # the shared points and its own
    rows = runner.dry_run(study, scale, peak_tflops=100.0, ends_only=True)
    tune = [r for r in rows if r["stage"] == "tune"]
    assert len(tune) == len(study.tune.points) * len(study.tune.values) * len(study.tune.seeds_for(scale))
    assert all(r["tokens"] < min(m["tokens"] for m in rows if m["stage"] == "main") for r in tune)  # the short budget
    text = runner.format_dry_run(study, scale, rows)
    assert "stage tune:" in text and "stage main:" in text and ("GPU-hours" in text) == (scale == "gpu")


def test_slicemoe_check_is_parameter_matched():
    study = dataclasses.replace(catalog.load_study("slicemoe_check"), seeds=1, tune=None)
    rows = runner.dry_run(study, "cpu", peak_tflops=1.0)
    by_e: dict[int, dict[str, int]] = {}
    for r in rows:
        if r["family"] != "dense":
            by_e.setdefault(r["experts"], {})[r["family"]] = r["params_total"]
    for e, p in by_e.items():
        assert abs(p["sectional"] - p["moe"]) / p["moe"] < 0.15, (e, p)
    # and its report compares with that token arm, a reference the report's CLI accepts
    from sectional_moe.report.cli import parse_reference

    args = study.report["args"]
    assert parse_reference(args[args.index("--reference") + 1]) == {"family": "moe", "top_k": 1}


def test_commands_share_the_study_group_and_scale_overrides():
    study = catalog.load_study("e_sweep")
    cmds = runner.train_commands(study, "cpu", ["hydra/launcher=slurm"])
    assert len(cmds) == len(study.sweep_lines("cpu")) == 5  # E = 16 of the alternating line has its own
    for cmd in cmds:
        assert cmd[2] == "-m" and "group=study-e_sweep-cpu" in cmd and "experiment=study_cpu" in cmd
        assert cmd[-1] == "hydra/launcher=slurm"


def test_unknown_study_or_scale_names_the_choices(capsys):
    with pytest.raises(ConfigError, match="use one of.*e_sweep"):
        catalog.load_study("nope")
    with pytest.raises(ConfigError, match="no scale 'tpu'"):
        catalog.load_study("e_sweep").jobs("tpu")
    assert cli.main(["dry-run", "nope"]) == 2
    assert "Error: study:" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("parallel", [2, 3])
def test_parallel_split_runs_exactly_the_same_jobs(name, parallel):
    """Splitting sweep lines for concurrent runs neither drops nor repeats a job."""
    study = catalog.load_study(name)

    def job_set(cmds):
        jobs = [frozenset(job) for cmd in cmds for job in expand_sweep(cmd[5:])]
        assert len(jobs) == len(set(jobs))
        return set(jobs)

    assert job_set(runner.train_commands(study, "cpu", [], parallel)) == job_set(runner.train_commands(study, "cpu", []))


def test_split_sweep_line_cuts_the_longest_plain_list():
    parts = runner.split_sweep_line("model=sectional experts=1,2,4,8,16 routing=segment_fixed,topk", 2)
    assert parts == ["model=sectional experts=1,4,16 routing=segment_fixed,topk", "model=sectional experts=2,8 routing=segment_fixed,topk"]
    # interpolations and quoted values are never split; a line without a plain list stays whole
    line = "model=moe \"model.expert_d_ff='${smoe.div:${size.d_ff},${experts}}'\""
    assert runner.split_sweep_line(line, 2) == [line]
    assert runner.split_sweep_line("model=dense", 4) == ["model=dense"]


def test_parallel_defaults_to_every_core_on_cpu_and_one_on_gpu(monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    assert runner.resolve_parallel("auto", "cpu") == 2 and runner.resolve_parallel("auto", "gpu") == 1
    assert runner.resolve_parallel("3", "gpu") == 3
    assert runner.resolve_parallel("auto", "cpu", catalog.load_study("cost_vs_e")) == 1  # it measures step time
    with pytest.raises(ConfigError):
        runner.resolve_parallel(0, "cpu")


def test_concurrent_sweeps_each_log_to_a_file_and_report_the_worst_exit_code(tmp_path, monkeypatch):
    import sys

    monkeypatch.delenv("OMP_NUM_THREADS")  # unset: each concurrent sweep gets one thread

    code = "import os, sys; print('threads', os.environ['OMP_NUM_THREADS']); sys.exit({})"
    cmds = [[sys.executable, "-c", code.format(rc), "x", "y"] for rc in (0, 3, 0)]
    assert runner._run_concurrently(cmds, 2, tmp_path / "logs") == 3
    logs = sorted((tmp_path / "logs").glob("sweep-*.log"))
    assert len(logs) == 3 and all(log.read_text().strip() == "threads 1" for log in logs)


def test_seeds_and_the_tuned_value_go_into_every_sweep_line_that_does_not_set_them():
    study = catalog.load_study("pre_expert_variants")
    tuned = {"dense": "0.005", "sectional-full": "0.002", "sectional-cross": "0.01", "sectional": "0.0035"}
    lines = study.sweep_lines("cpu", tuned)
    assert all(line.split()[-2] == "seed=0,1,2" for line in lines)
    by_reading = {next(t for t in line.split() if t.startswith(("model.pre_expert_resolution=", "model=dense"))): line.split()[-1]
                  for line in lines}
    assert by_reading == {"model.pre_expert_resolution=short": "optim.lr=0.0035", "model.pre_expert_resolution=full": "optim.lr=0.002",
                          "model.pre_expert_resolution=cross": "optim.lr=0.01", "model=dense": "optim.lr=0.005"}
    # a point never tuned leaves its lines at the config's value
    assert all("optim.lr" not in line for line in study.sweep_lines("cpu", {}))


def test_a_tuning_stage_runs_one_sweep_per_point_in_the_shared_group_and_picks_the_lowest_loss(tmp_path, monkeypatch):
    from sectional_moe.runs.layout import RunDir

    study = catalog.load_study("seq_reduction")
    assert [p.name for p in study.tune.points] == ["dense", "moe", "sectional-E16", "sectional"]
    commands = runner.train_commands(study, "cpu", [], stage="tune")
    assert len(commands) == 4 and all(f"group={study.tune_group('cpu')}" in c for c in commands)
    assert all("trainer.max_steps=500" in c and "optim.lr=0.002,0.0035,0.005,0.007,0.01" in c for c in commands)
    # finished tuning jobs in the shared sweep directory: the value with the lowest best val loss wins
    directory = tmp_path / runner.TASK_NAME / "multirun" / study.tune_group("cpu")
    losses = {"0.002": 4.1, "0.0035": 3.9, "0.005": 3.8, "0.007": 3.85, "0.01": 4.4}
    point = study.tune.points[0]
    pinned = ["trainer.precision=32-true"]  # the study's own overrides (runner.pinned_precision) go into every job
    for i, job in enumerate(expand_sweep(study.tune.line(point, "cpu").split())):
        launched = [f"task_name={runner.TASK_NAME}", f"group={study.tune_group('cpu')}"] + study.scale_overrides("cpu") + job + pinned
        run = RunDir(directory / f"job-{i}")  # found by what Hydra recorded, whatever the directory name
        run.hydra_overrides.parent.mkdir(parents=True)
        run.hydra_overrides.write_text("".join(f"- {o}\n" for o in launched))
        lr = next(o.split("=", 1)[1] for o in job if o.startswith("optim.lr="))
        run.mark_done({"val/loss_best": losses[lr]}, {})
    assert runner.tuning_results(study, "cpu", log_dir=tmp_path)["points"]["dense"]["winner"] is None  # other jobs
    results = runner.tuning_results(study, "cpu", log_dir=tmp_path, extra=pinned)
    assert results["points"]["dense"]["winner"] == "0.005"
    assert results["points"]["dense"]["val_loss_best"] == losses
    assert results["points"]["moe"]["winner"] is None and len(results["points"]["moe"]["missing"]) == 5
    assert runner.winners(results) == {"dense": "0.005"}
    json.dumps(results)  # written as tuning.json next to the report


def test_a_bad_tuning_or_seed_setting_names_the_key(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text("question: q?\nhypothesis: h\nmetric: val/ppl\nread: r\nsweeps: [model=dense]\n"
                                       "scales: {cpu: []}\nseeds: 0\n")
    monkeypatch.setattr(catalog, "STUDIES_DIR", tmp_path)
    with pytest.raises(ConfigError, match="seeds=0 must be a whole number >= 1"):
        catalog.load_study("bad")
    (tmp_path / "bad.yaml").write_text("question: q?\nhypothesis: h\nmetric: val/ppl\nread: r\nsweeps: [model=dense]\n"
                                       "scales: {cpu: []}\ntune: nosuch\n")
    with pytest.raises(ConfigError, match="no tuning stage 'nosuch'"):
        catalog.load_study("bad")


def test_cpu_studies_share_one_precision_decided_once_per_machine(tmp_path, monkeypatch):
    """precision=auto races bf16 against fp32 per process; a study's jobs get one recorded choice."""
    import sectional_moe.device as device

    calls = []

    def choose(trainer):
        calls.append(dict(trainer))
        return device.PrecisionChoice("bf16-mixed" if len(calls) == 1 else "32-true", f"probe {len(calls)}")

    monkeypatch.setattr(device, "choose_precision", choose)
    first = runner.pinned_precision([], parallel=2, log_dir=tmp_path)
    again = runner.pinned_precision(["seed=1"], parallel=2, log_dir=tmp_path)  # a later study or a resume
    assert first == again == "trainer.precision=bf16-mixed" and len(calls) == 1
    assert json.loads((tmp_path / "studies" / "precision-cpu.json").read_text())["reason"] == "probe 1"
    assert runner.pinned_precision(["trainer.precision=32-true"], 1, tmp_path) == "trainer.precision=32-true"


def test_a_terminated_study_runner_stops_its_sweeps_and_starts_nothing_more(tmp_path, monkeypatch):
    """SIGTERM to the runner reaches every sweep it started (they checkpoint and exit), nothing
    further starts, and the runner's exit code is 143: no sweep is left running as an orphan."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    monkeypatch.setattr(runner, "_STOPPED_BY", [])
    pid_file = tmp_path / "child.pid"
    child = ("import os, signal, sys, time; open(sys.argv[1], 'w').write(str(os.getpid()));"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); time.sleep(60)")
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with runner.children_stop_with_runner():
        timer.start()
        first = runner._call([sys.executable, "-c", child, str(pid_file)], stdout=subprocess.DEVNULL)
        second = runner._call([sys.executable, "-c", f"open({str(tmp_path / 'started')!r}, 'w')"])
    timer.join()
    assert first == 143 and second == 143 and not (tmp_path / "started").exists() and not runner._CHILDREN
    assert not os.path.exists(f"/proc/{pid_file.read_text()}")  # stopped and reaped
    assert runner.stop_exit_code() == 143 and signal.getsignal(signal.SIGTERM) == before


def test_a_stopped_runner_leaves_queued_sweeps_their_logs_and_writes_no_report(tmp_path, monkeypatch):
    """After SIGTERM the queued sweeps are not announced as started, their logs from an earlier pass
    stay, and the study's committed report is not replaced by one of a partial pass."""
    import sys

    monkeypatch.setattr(runner, "_STOPPED_BY", [])
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "sweep-01.log").write_text("the earlier pass\n")
    noop = "import sys; sys.exit(0)"
    calls = []

    def call(cmd, **kwargs):  # the first sweep is stopped while it runs
        calls.append(cmd)
        runner._STOPPED_BY.append(15)
        return 143

    monkeypatch.setattr(runner, "_call", call)
    cmds = [[sys.executable, "-c", noop, "a", "b"]] * 3
    assert runner._run_concurrently(cmds, 1, logs) == 143
    assert len(calls) == 1 and (logs / "sweep-01.log").read_text() == "the earlier pass\n"

    runner._STOPPED_BY.clear()
    study = catalog.load_study("cost_vs_e")
    monkeypatch.setattr(runner, "pinned_precision", lambda extra, parallel: "trainer.precision=32-true")
    monkeypatch.setattr(runner, "sweep_dir", lambda study, scale: tmp_path / "sweep")
    reports = []
    monkeypatch.setattr(runner, "_report", lambda *a: reports.append(a) or 0)
    assert runner.run(study, "cpu", [], tmp_path / "report", parallel=2) == 143
    assert reports == [] and not (tmp_path / "report").exists()


def test_tuning_jobs_are_found_when_the_scale_and_the_stage_set_the_same_key(tmp_path):
    """isoflop's cpu scale sets trainer.val_check_interval=auto and the tuning stage =125: Hydra's
    sweeper keeps one override with the later value, and that is what the job records."""
    from sectional_moe.runs.layout import RunDir

    study = catalog.load_study("isoflop")
    assert "trainer.val_check_interval=auto" in study.scale_overrides("cpu")
    directory = tmp_path / runner.TASK_NAME / "multirun" / study.tune_group("cpu")
    point = study.tune.points[0]
    for i, lr in enumerate(study.tune.values):
        recorded = [f"task_name={runner.TASK_NAME}", f"group={study.tune_group('cpu')}", "experiment=study_cpu",
                    "trainer.val_check_interval=125", *point.train, "trainer.max_steps=500", f"optim.lr={lr}", "seed=0"]
        run = RunDir(directory / f"job-{i}")
        run.hydra_overrides.parent.mkdir(parents=True)
        run.hydra_overrides.write_text("".join(f"- {o}\n" for o in recorded))
        run.mark_done({"val/loss_best": 4.0 + i}, {})
    result = runner.tuning_results(study, "cpu", log_dir=tmp_path)["points"][point.name]
    assert result["missing"] == [] and result["winner"] == str(study.tune.values[0])


def test_a_tuning_stage_with_several_seeds_trains_each_value_from_each_and_ranks_by_their_mean(tmp_path):
    from sectional_moe.runs.layout import RunDir

    study = catalog.load_study("e_sweep")
    assert study.tune.seeds_for("cpu") == [0] and study.tune.seeds_for("gpu") == [0, 1]  # experiments/tuning/lr.yaml
    assert "seed=0,1" in study.tune.line(study.tune.points[0], "gpu")
    assert "each value from seeds 0, 1 (ranked by the mean)" in runner.format_dry_run(study, "gpu", [])
    assert "each value from seed 0," in runner.format_dry_run(study, "cpu", [])
    assert sum(len(expand_sweep(c[3:])) for c in runner.train_commands(study, "gpu", [], stage="tune")) == \
        2 * sum(len(expand_sweep(c[3:])) for c in runner.train_commands(study, "cpu", [], stage="tune"))
    # seed 0 alone prefers 0.005, the mean over both seeds 0.0035 (seed 1 of 0.005 is a bad seed)
    study = dataclasses.replace(study, tune=dataclasses.replace(study.tune, seeds={"*": [0, 1]}))
    losses = {("0.0035", "0"): 3.9, ("0.0035", "1"): 3.9, ("0.005", "0"): 3.85, ("0.005", "1"): 4.3}
    directory = tmp_path / runner.TASK_NAME / "multirun" / study.tune_group("cpu")
    point = study.tune.points[0]
    jobs = expand_sweep([f"task_name={runner.TASK_NAME}", f"group={study.tune_group('cpu')}", *study.scale_overrides("cpu"),
                         *shlex.split(study.tune.line(point, "cpu"))])
    for i, job in enumerate(jobs):
        lr, seed = (next(o.split("=", 1)[1] for o in job if o.startswith(k)) for k in ("optim.lr=", "seed="))
        if (lr, seed) not in losses:
            continue
        run = RunDir(directory / f"job-{i}")
        run.hydra_overrides.parent.mkdir(parents=True)
        run.hydra_overrides.write_text("".join(f"- {o}\n" for o in job))
        run.mark_done({"val/loss_best": losses[lr, seed]}, {})
    result = runner.tuning_results(study, "cpu", log_dir=tmp_path)["points"][point.name]
    assert result["winner"] is None and "0.002" in result["missing"]  # the other values have not run
    assert result["val_loss_best"]["0.005"] == pytest.approx(4.075) and result["val_loss_best_by_seed"]["0.005"] == {"0": 3.85, "1": 4.3}


def test_bad_tuning_seeds_name_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "STUDIES_DIR", tmp_path)
    for bad in ("0", "[-1]", "{cpu: 0}", "true"):
        (tmp_path / "bad.yaml").write_text("question: q?\nhypothesis: h\nmetric: val/ppl\nread: r\nsweeps: [model=dense]\n"
                                           f"scales: {{cpu: []}}\ntune: {{base: lr, seeds: {bad}}}\n")
        with pytest.raises(ConfigError, match="tune.seeds"):
            catalog.load_study("bad")


def test_run_all_runs_the_road_map_in_order_and_a_stop_ends_the_list(monkeypatch, capsys):
    assert set(catalog.ROAD_MAP) == set(catalog.study_names())  # every study has its place in the road map
    calls = []

    def fake_run(study, scale, overrides, out, parallel):
        calls.append((study.name, list(overrides), out))
        return 0

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.setattr(runner, "_STOPPED_BY", [])
    assert cli.main(["run", "all", "--no-report", "hydra/launcher=slurm"]) == 0
    assert [c[0] for c in calls] == list(catalog.ROAD_MAP)
    assert all(c[1] == ["hydra/launcher=slurm"] and c[2] is None for c in calls)

    calls.clear()
    assert cli.main(["run", "seq_reduction", "e_sweep", "--no-report"]) == 0  # several, in the order given
    assert [c[0] for c in calls] == ["seq_reduction", "e_sweep"]

    calls.clear()
    assert cli.main(["run", "e_sweep", "nope"]) == 2 and calls == []  # all named studies are checked first
    assert cli.main(["run", "e_sweep", "--scale", "tpu"]) == 2 and calls == []
    capsys.readouterr()

    def stopped_run(study, scale, overrides, out, parallel):  # SIGTERM arrives during the first study
        calls.append(study.name)
        runner._STOPPED_BY.append(15)
        return 143

    monkeypatch.setattr(cli, "run", stopped_run)
    assert cli.main(["run", "all", "--no-report"]) == 143 and calls == ["e_sweep"]


def test_printed_commands_are_sweeps_a_user_can_paste(capsys):
    assert cli.main(["commands", "cost_vs_e", "hydra/launcher=slurm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("python train.py -m task_name=studies ") for line in lines)
    assert all(line.endswith("hydra/launcher=slurm") for line in lines)
