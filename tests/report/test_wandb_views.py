"""W&B comparison views as code (issue 21): the workspace and report of a real sweep, offline.

One module fixture trains a tiny real sweep in-process with W&B offline (4 nano runs of 4 steps:
dense, two seeds of a 2-expert token MoE, a 4-section sectional MoE), builds its report and logs
the report run offline. The views are then checked against what those runs wrote to their
``run-*.wandb`` files (read back independently of the code under test): every key a panel,
column, grouping, filter or sort reads was logged; grouping leaves only seeds together; the
filter keeps exactly the train runs; and the ``wandb_workspaces`` objects validate against the
library's own models. No test needs the network: saving is checked with the library's network
calls replaced.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sectional_moe.report import wandb_views as wv

REPO = Path(__file__).resolve().parents[2]
GROUP = "views-test"
PROJECT = "sectional-moe"
#: nano runs of 4 steps (two evaluations), W&B offline plus CSV; the MFU peak is fixed so no CPU probe runs
BASE = [
    "size=nano", "data.vocab_size=512", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "optim.warmup_steps=1", "hardware.peak_tflops=1.0",
    "logger=[wandb,csv]", "logger.wandb.mode=offline", "task_name=views", f"group={GROUP}",
]
RUNS = {
    "dense": ["model=dense"],
    "moe-e2-s0": ["model=moe", "experts=2", "seed=0"],
    "moe-e2-s1": ["model=moe", "experts=2", "seed=1"],
    "sect-e4": ["model=sectional", "experts=4"],
}


# ============================================================================================
# The sweep, and what its W&B files hold (read without the code under test)
# ============================================================================================
def _job_type(run_dir: Path) -> str:
    from wandb.proto import wandb_internal_pb2 as pb

    from sectional_moe.tracking.wandb_files import find_run_file, iter_raw_records

    for raw in iter_raw_records(find_run_file(run_dir)):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            return rec.run.job_type
    raise AssertionError(f"{run_dir}: no run record")


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """The config as W&B addresses it: top-level keys, and the leaves of nested dicts as a.b."""
    out = dict(config)
    for k, v in config.items():
        if isinstance(v, dict) and k != "_wandb":
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
    return out


def _read(run_dir: Path) -> dict[str, Any]:
    from sectional_moe.tracking.wandb_files import read_run

    r = read_run(run_dir)
    return {"id": r["run"]["id"], "group": r["run"]["group"], "job_type": _job_type(run_dir), "config": _flat(r["config"]),
            "history": set().union(*r["history"]) if r["history"] else set(), "summary": set(r["summary"])}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train the sweep, build its report, log the report run; return everything the tests read."""
    import wandb
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sectional_moe import resolvers
    from sectional_moe.report.html import build_report, write_report
    from sectional_moe.report.sources import collect
    from sectional_moe.report.wandb_dashboard import log_report
    from sectional_moe.tracking.wandb_files import run_dirs
    from sectional_moe.training.run import train

    root = tmp_path_factory.mktemp("views-sweep")
    resolvers.register()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")  # restored afterwards (Lightning's WandbLogger never unsets it)
        for name, overrides in RUNS.items():
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose(config_name="train", overrides=[*BASE, *overrides, f"paths.output_dir={root / 'sweep' / name}"])
            train(cfg)
            wandb.finish()
        GlobalHydra.instance().clear()
        table = collect(root / "sweep", kind="runs")
        report = build_report(table, source=str(root / "sweep"), n_boot=2)
        out = root / "report"
        write_report(report, out)
        info = log_report(report, out / "figures", mode="offline", project=PROJECT, save_dir=out)
    runs = {name: _read(d) for name in RUNS for d in run_dirs(root / "sweep" / name)}
    (report_dir,) = run_dirs(out)
    return {"root": root, "table": table, "report": report, "out": out, "runs": runs, "report_run": _read(report_dir),
            "report_run_id": info["id"]}


@pytest.fixture(scope="module")
def logged(sweep) -> wv.LoggedKeys:
    """The keys the train runs logged, as the CLI gathers them (from the offline W&B files)."""
    from sectional_moe.report.sources.wandb_offline import (
        find_wandb_files,
        read_wandb_files,
    )

    keys = wv.LoggedKeys()
    for files in find_wandb_files(sweep["root"] / "sweep").values():
        rec = read_wandb_files(files)
        if rec is not None and rec.group == GROUP:
            keys.add_record(rec)
    return keys


@pytest.fixture(scope="module")
def specs(sweep, logged) -> dict[str, dict[str, Any]]:
    options = wv.ViewOptions(project=PROJECT)
    return {kind: wv.build_view_spec(kind, sweep["report"], options, keys=logged) for kind in wv.KINDS}


def _union(sweep, part: str) -> set[str]:
    return set().union(*(set(r[part]) for r in sweep["runs"].values()))


def _exists(sweep, runset: str, section: str, name: str) -> bool:
    """Whether a key (section, name) was logged by the runs the runset shows."""
    if runset == "report":
        rr = sweep["report_run"]
        media = {k.rsplit("/", 1)[0] for k in rr["history"] if k.endswith("/_type")}
        return (section == "history" and name in media) or (section == "run" and name in ("name", "id"))
    if section == "config":
        return name in _union(sweep, "config")
    if section == "summary":
        return name in _union(sweep, "summary")
    if section == "history":
        return name in _union(sweep, "history")
    return name in ("group", "jobType", "name", "displayName", "state")


# ============================================================================================
# The plain-data spec
# ============================================================================================
def test_the_sweep_logged_what_the_views_need(sweep):
    assert len(sweep["runs"]) == 4 and all(r["group"] == GROUP and r["job_type"] == "train" for r in sweep["runs"].values())
    assert sweep["report_run"]["job_type"] == "report" and sweep["report_run"]["id"] == sweep["report_run_id"]
    assert {"summary/val_ppl_best", "summary/tokens_per_s", "moe/load_max_over_mean"} <= _union(sweep, "summary")
    assert {"val/loss", "perf/tokens", "perf/flops"} <= _union(sweep, "history")


def test_every_key_a_spec_reads_was_logged_by_the_runs_it_shows(sweep, specs):
    for kind, spec in specs.items():
        keys = wv.view_keys(spec)
        assert len(keys) > 40, kind
        missing = [(rs, k) for rs, k in keys if not _exists(sweep, rs, k["section"], k["name"])]
        assert missing == [], (kind, missing)
        titles = [p["title"] for s in wv.view_sections(spec) for p in s["panels"]]
        for wanted in ("best val ppl vs E (every run)", "best val ppl per group (mean ± std over seeds)", "tokens/s vs E (steady state)",
                       "peak memory vs E (peak_rss_gib)", "val loss vs tokens", "val loss vs training FLOPs",
                       "expert load max/mean vs E (last window)", "step time vs E (steady state)", "report figures"):
            assert wanted in titles, (kind, wanted)
        assert spec["omitted"] == [] and spec["keys_checked"]["summary"] is True


def test_a_panel_whose_keys_no_run_logged_is_left_out_and_listed(sweep):
    dense_only = wv.LoggedKeys()
    dense = sweep["runs"]["dense"]
    dense_only.add(dense["config"], [dict.fromkeys(dense["history"])], dict.fromkeys(dense["summary"]))
    spec = wv.build_view_spec("workspace", sweep["report"], wv.ViewOptions(project=PROJECT), keys=dense_only)
    left_out = {o["panel"]: o["missing"] for o in spec["omitted"]}
    assert "expert load CV vs tokens" in left_out and left_out["expert load CV vs tokens"] == ["moe/load_cv"]
    assert all(p["title"] not in left_out for s in spec["sections"] for p in s["panels"])
    assert not any(c["name"] == "moe/load_max_over_mean" for c in spec["runsets"]["train"]["columns"])


def test_grouping_keys_exist_in_every_run_and_leave_only_seeds_together(sweep, specs):
    rs = specs["workspace"]["runsets"]["train"]
    names = [k["name"] for k in rs["groupby"]]
    assert names[:2] == ["routing_name", "family"] and names[-1] == "experts"
    for run in sweep["runs"].values():
        assert all(n in run["config"] for n in names), (names, sorted(run["config"])[:20])
    groups: dict[tuple, list[str]] = {}
    for name, run in sweep["runs"].items():
        groups.setdefault(tuple(str(run["config"][n]) for n in names), []).append(name)
    assert sorted(sorted(g) for g in groups.values()) == [["dense"], ["moe-e2-s0", "moe-e2-s1"], ["sect-e4"]]
    # coloured by E: every train run by its id, one colour per E, dense grey
    by_id = {run["id"]: run["config"]["experts"] for run in sweep["runs"].values()}
    assert set(rs["run_colors"]) == set(by_id)
    colour_of_e = {}
    for rid, e in by_id.items():
        colour_of_e.setdefault(e, set()).add(rs["run_colors"][rid])
    assert all(len(c) == 1 for c in colour_of_e.values()) and len({next(iter(c)) for c in colour_of_e.values()}) == 3
    assert colour_of_e[None] == {wv.GREY}


def _passes(run: dict[str, Any], runset: dict[str, Any]) -> bool:
    """Whether a run (as read from its W&B file) passes a runset's filters (all "=" on run attributes)."""
    attrs = {"group": run["group"], "jobType": run["job_type"], "name": run["id"]}
    assert all(f["op"] == "=" and f["key"]["section"] == "run" for f in runset["filters"])
    return all(attrs[f["key"]["name"]] == f["value"] for f in runset["filters"])


def test_filters_keep_exactly_the_train_runs_and_pin_the_report_run(sweep, specs):
    passes = _passes
    for spec in specs.values():
        train, report = spec["runsets"]["train"], spec["runsets"]["report"]
        assert [(f["key"]["section"], f["key"]["name"], f["op"]) for f in train["filters"]] == [("run", "group", "="), ("run", "jobType", "=")]
        assert all(passes(r, train) for r in sweep["runs"].values())
        assert not passes(sweep["report_run"], train) and passes(sweep["report_run"], report)
        assert not any(passes(r, report) for r in sweep["runs"].values())
        assert train["pinned_runs"] == [sweep["report_run"]["id"]] == [spec["report_run"]["id"]]


def test_the_view_identity_comes_from_project_and_group(sweep, specs, logged):
    again = wv.build_view_spec("workspace", sweep["report"], wv.ViewOptions(project=PROJECT), keys=logged)
    assert json.dumps(again) == json.dumps(specs["workspace"])  # deterministic: the same file every run
    other = wv.build_view_spec("workspace", sweep["report"], wv.ViewOptions(project=PROJECT, group="other"), keys=None)
    elsewhere = wv.build_view_spec("workspace", sweep["report"], wv.ViewOptions(project="p2"), keys=None)
    ws, rep = specs["workspace"], specs["report"]
    assert ws["key"] == wv.view_key("workspace", PROJECT, GROUP) and ws["internal_name"] == f"nw-{ws['key']}-v"
    assert len({ws["key"], rep["key"], other["key"], elsewhere["key"], ws["report_run"]["id"]}) == 5
    assert wv.description_tag(rep["key"]) in rep["description"]
    assert wv.safe_title("sweep-experts=4+8 ×") == "sweep-experts_4_8 _"


def test_a_spec_file_round_trips_and_a_broken_one_is_refused_in_one_line(specs, tmp_path):
    path = wv.write_spec(specs["report"], tmp_path)
    assert path.name == "wandb-report.json" and wv.read_spec(path) == specs["report"]
    bad = tmp_path / "bad.json"
    for text, words in (("{}", "not a view spec"), ("[1", "not JSON"),
                        (json.dumps({**specs["workspace"], "version": 99}), "spec version 99")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=words) as err:
            wv.read_spec(bad)
        assert "\n" not in str(err.value) and "--wandb-workspace-from" in str(err.value)


# ============================================================================================
# The wandb_workspaces objects
# ============================================================================================
needs_library = pytest.mark.skipif(not wv.workspaces_available(), reason="wandb-workspaces not installed (pip install -e '.[wandb-views]')")


def _keys_of_panel_models(section_panels: list[Any]) -> list[tuple[str, str]]:
    """(section, name) of every key the library's panel models read, decoded from their wire form."""
    out = []
    for p in section_panels:
        c = p.config
        kind = type(p).__name__
        if kind == "LinePlot":
            out += [("history", c.x_axis)] + [("history", m) for m in c.metrics]
        elif kind == "ScatterPlot":
            for axis in (c.x_axis, c.y_axis):
                section, name = axis.split(":", 1)
                out.append((section, name[: -len(".value")] if section == "config" else name))
        elif kind == "BarPlot":
            out += [("summary", m) for m in c.metrics]
        elif kind == "MediaBrowser":
            out += [("history", m) for m in c.media_keys]
        elif kind == "WeavePanel":
            out.append(("history", "comparison") if '"comparison"' in json.dumps(c) else ("?", kind))
        else:
            out.append(("?", kind))
    return out


def _decode_column(col: str) -> tuple[str, str]:
    section, name = col.split(":", 1)
    return (section, name[: -len(".value")]) if section == "config" else (section, name)


@needs_library
def test_the_workspace_validates_against_the_library_models_and_reads_only_logged_keys(sweep, specs):
    from wandb_workspaces import expr
    from wandb_workspaces.workspaces import Workspace, internal

    spec = specs["workspace"]
    obj = wv.to_workspace(spec, entity="test-entity")
    model = obj._to_model()  # the wire model the API receives; building it needs no network
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a block or panel the library cannot type would only warn
        again = internal.View.model_validate_json(model.model_dump_json(by_alias=True, exclude_none=True))  # as saved
    assert again.spec.section.panel_bank_config.sections[0].name == spec["sections"][0]["name"]
    loaded = Workspace._from_model(model)
    assert [(s.name, len(s.panels), s.pinned) for s in loaded.sections] == [(s["name"], len(s["panels"]), s["pinned"]) for s in spec["sections"]]
    assert loaded.name == spec["name"] and loaded.settings.x_axis == "perf/tokens" and loaded.settings.max_runs >= 10
    for section, s in zip(model.spec.section.panel_bank_config.sections, spec["sections"]):
        runset = "report" if s["runset"] == "report" else "train"
        for sec, name in _keys_of_panel_models(section.panels):
            assert _exists(sweep, runset, sec, name), (s["name"], sec, name)
    rs = model.spec.section.run_sets[0]
    # grouping: config keys in the backend form, each one logged by every run
    assert [g.section for g in rs.grouping] == ["config"] * 3
    assert [g.name for g in rs.grouping] == ["routing_name.value", "family.value", "experts.value"]
    # filters: the library's own parser reads the filter back as group = G AND jobType = train
    tree = expr.expr_to_filters(loaded.runset_settings.filters)
    leaves = tree.filters if tree.op == "AND" else [tree]
    assert sorted((f.key.section, f.key.name, f.op, f.value) for f in leaves) == [("run", "group", "=", GROUP), ("run", "jobType", "=", "train")]
    assert expr.is_filter_v2(rs.filters)  # the wire form the app reads: both leaves enabled, joined by AND
    assert [(f["key"]["name"], f["op"], f["value"], f["disabled"]) for f in rs.filters["filters"]] == [
        ("group", "=", GROUP, False), ("jobType", "=", "train", False)]
    assert rs.filters["filters"][1].get("connector") == "AND"
    # runs table: every column logged; sorted by best val ppl, best first
    for col in rs.run_feed.column_order:
        sec, name = _decode_column(col)
        assert sec == "run" or _exists(sweep, "train", sec, name), col
    assert [(k.key.section, k.key.name, k.ascending) for k in rs.sort.keys] == [("summary", "summary/val_ppl_best", True)]
    assert loaded.runset_settings.pinned_runs == [sweep["report_run"]["id"]]
    colours = model.spec.section.custom_run_colors
    assert {r["id"] for r in sweep["runs"].values()} <= set(colours)


@needs_library
def test_the_report_validates_against_the_library_models(sweep, specs, monkeypatch):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import interface, internal

    asked = []

    def project_id(api, query, variables):  # Runset._to_model asks for the project's internal id: answer offline
        asked.append(variables)
        return {"project": {"internalId": "UHJvamVjdDoxMjM="}}

    monkeypatch.setattr(interface, "execute_graphql", project_id)
    monkeypatch.setattr(interface, "_get_api", lambda: None)
    spec = specs["report"]
    obj = wv.to_report(spec, entity="test-entity")
    model = obj._to_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a block or panel the library cannot type would only warn
        again = internal.ReportViewspec.model_validate_json(model.model_dump_json(by_alias=True, exclude_none=True))  # as saved
        loaded = wr.Report._from_model(again)
    assert not any(isinstance(b, (wr.interface.UnknownBlock,)) for b in loaded.blocks)
    assert [type(b).__name__ for b in loaded.blocks] == [type(b).__name__ for b in obj.blocks]
    assert again.display_name == spec["name"] and wv.description_tag(spec["key"]) in again.description
    assert all(v == {"entityName": "test-entity", "projectName": PROJECT} for v in asked) and asked
    kinds = [type(b).__name__ for b in obj.blocks]
    assert kinds.count("PanelGrid") == 5 and kinds[0] == "MarkdownBlock"
    prose = obj.blocks[0].text
    best = sweep["table"].sort_values("val_ppl_best").iloc[0]
    assert f"{best['val_ppl_best']:.4g}" in prose and "2 seeds" in prose and "unigram" in prose
    table_md = obj.blocks[2].text
    assert table_md.count("\n| ") == 4 and "val ppl best" in table_md  # header + 4 finished runs
    grids = [b for b in obj.blocks if isinstance(b, wr.PanelGrid)]
    for grid, block in zip(grids, [b for b in spec["blocks"] if b["type"] == "panel_grid"]):
        (runset,) = grid.runsets
        assert runset.project == PROJECT and runset.entity == "test-entity"
        for sec, name in _keys_of_panel_models([p._to_model() for p in grid.panels]):
            assert _exists(sweep, block["runset"], sec, name), (block["runset"], sec, name)
    train_rs = grids[1].runsets[0]._to_model()
    assert [g.name for g in train_rs.grouping] == ["routing_name.value", "family.value", "experts.value"]
    report_rs = grids[0].runsets[0]._to_model()
    assert report_rs.filters["filters"][0]["key"] == {"section": "run", "name": "name"}
    assert report_rs.filters["filters"][0]["value"] == sweep["report_run"]["id"]
    assert loaded.title == spec["name"]


@needs_library
def test_rerunning_updates_the_same_view_instead_of_adding_one(specs, tmp_path, monkeypatch):
    import wandb
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    saved: list[Any] = []
    existing: dict[str, str] = {}

    class View:
        def __init__(self, id_: str):
            self.id = id_

    def from_name(entity, project, name):
        if name not in existing:
            raise ValueError(f"Workspace `{name}` not found in project `{project}`")
        return View(existing[name])

    def save_workspace(self):
        saved.append(("workspace", self._internal_name, self._internal_id))
        existing.setdefault(self._internal_name, "VIEW-1")
        return self

    class Report:
        def __init__(self, description, id_):
            self.description, self.id = description, id_

    reports: list[Report] = []

    class Api:
        default_entity = "test-entity"

        def reports(self, path):
            assert path == f"test-entity/{PROJECT}"
            return list(reports)

    def save_report(self):
        saved.append(("report", self.description, self.id))
        if not self.id:
            self.id = "REPORT-1"
            reports.append(Report(self.description, self.id))
        return self

    monkeypatch.setattr(internal.View, "from_name", staticmethod(from_name))
    monkeypatch.setattr(ws.Workspace, "save", save_workspace)
    monkeypatch.setattr(ws.Workspace, "url", property(lambda self: f"https://wandb.test/{self.entity}/{self.project}?nw={self._internal_name}"))
    monkeypatch.setattr(wr.Report, "save", save_report)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.test/reports/{self.id}"))
    monkeypatch.setattr(wandb, "Api", Api)
    monkeypatch.setattr(wv, "offline_reason", lambda mode: None)
    monkeypatch.setattr(wv, "server_reachable", lambda timeout_s: None)
    for spec in specs.values():
        path = wv.write_spec(spec, tmp_path)
        first, second = wv.publish(spec, path), wv.publish(spec, path)
        assert (first.status, second.status) == ("created", "updated"), (first.message, second.message)
        assert second.url == first.url and "\n" not in second.message
    ws_name = specs["workspace"]["internal_name"]
    tag = wv.description_tag(specs["report"]["key"])
    assert [s for s in saved if s[0] == "workspace"] == [("workspace", ws_name, ""), ("workspace", ws_name, "VIEW-1")]
    assert [(s[2], tag in s[1]) for s in saved if s[0] == "report"] == [("", True), ("REPORT-1", True)]


# ============================================================================================
# The command line, offline
# ============================================================================================
@pytest.fixture
def no_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_cli_without_a_key_writes_both_specs_and_says_so_in_one_line(sweep, no_key, tmp_path, capsys, logged):
    from sectional_moe.report.cli import main as report_main

    out = tmp_path / "out"
    code = report_main([str(sweep["root"] / "sweep"), "--out", str(out), "--no-progress", "--n-boot", "2",
                        "--wandb-workspace", "--wandb-report"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = [line for line in printed.splitlines() if "W&B workspace" in line or "W&B report" in line]
    # the first reason that applies (the package comes first when it is missing)
    why = "not created: no W&B API key" if wv.workspaces_available() else "wandb-workspaces is not installed"
    assert len(lines) == 2 and all(why in line and "spec written to" in line for line in lines), lines
    assert ("--wandb-workspace-from" in lines[0]) == wv.workspaces_available() and "left out" not in printed
    for kind, name in wv.SPEC_FILES.items():
        spec = wv.read_spec(out / name)
        assert spec["kind"] == kind and spec["group"] == GROUP and spec["omitted"] == []
        assert spec["keys_checked"] == {**spec["keys_checked"], "config": True, "history": True, "summary": True}
    # the views imply the summary run (its figures are the views' media): logged offline, same id as pinned
    assert "W&B summary run" in printed and sweep["report_run_id"] in printed
    assert wv.read_spec(out / "wandb-workspace.json")["runsets"]["train"]["pinned_runs"] == [sweep["report_run_id"]]

    # later: the file alone, still without a key -> one line, exit 1 (nothing was created)
    assert report_main(["--wandb-workspace-from", str(out / "wandb-workspace.json")]) == 1
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert why in line and f"spec {out / 'wandb-workspace.json'} kept" in line


def test_cli_with_a_key_but_no_server_says_so_in_one_line(sweep, tmp_path, monkeypatch, capsys):
    from sectional_moe.report.cli import main as report_main

    spec_path = wv.write_spec(wv.build_view_spec("workspace", sweep["report"], wv.ViewOptions(project=PROJECT)), tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: refused at once, nothing leaves the machine
    if not wv.workspaces_available():
        pytest.skip("wandb-workspaces not installed: the package line comes first")
    assert report_main(["--wandb-workspace-from", str(spec_path), "--wandb-timeout", "2"]) == 1
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "not created: the W&B server http://127.0.0.1:9 is not reachable within 2 s" in line
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert report_main(["--wandb-workspace-from", str(spec_path)]) == 1
    assert "WANDB_MODE=offline asks for no network" in capsys.readouterr().out


def test_cli_without_the_package_says_how_to_install_it(sweep, no_key, tmp_path, monkeypatch, capsys):
    from sectional_moe.report.cli import main as report_main

    for mod in [m for m in sys.modules if m.startswith("wandb_workspaces")] + ["wandb_workspaces"]:
        monkeypatch.setitem(sys.modules, mod, None)  # import wandb_workspaces -> ImportError
    assert not wv.workspaces_available()
    spec_path = wv.write_spec(wv.build_view_spec("report", sweep["report"], wv.ViewOptions(project=PROJECT)), tmp_path)
    assert report_main(["--wandb-workspace-from", str(spec_path)]) == 1
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "wandb-workspaces is not installed" in line and "pip install -e '.[wandb-views]'" in line
    result = wv.publish(wv.read_spec(spec_path), spec_path)  # what the SOURCE path reports: deferred -> exit 0
    assert result.status == "deferred" and f"spec written to {spec_path}" in result.message


@needs_library
def test_a_spec_that_makes_no_valid_library_object_is_refused_offline(specs, tmp_path, no_key):
    broken = json.loads(json.dumps(specs["workspace"]))
    broken["sections"][1]["panels"][0]["x"] = {"section": "config", "name": "model.sectional_every"}
    result = wv.publish(broken, wv.write_spec(broken, tmp_path))
    assert result.status == "failed" and "does not make valid wandb-workspaces objects" in result.message
    assert "a scatter axis takes a top-level config key" in result.message and "\n" not in result.message


def test_cli_refuses_bad_view_arguments_in_one_line(sweep, tmp_path, capsys):
    from sectional_moe.report.cli import main as report_main

    assert report_main(["--wandb-workspace-from", str(tmp_path / "nope.json")]) == 2
    assert "--wandb-workspace-from" in capsys.readouterr().err
    assert report_main([]) == 2
    assert "SOURCE is required" in capsys.readouterr().err
    assert report_main(["--wandb-workspace-from", "x.json", "--wandb-timeout", "0"]) == 2
    assert "--wandb-timeout 0.0: use a positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--wandb-view-group-by.*nope"):
        logged = wv.LoggedKeys()
        logged.add({"experts": 2, "family": "moe"})
        wv.build_view_spec("workspace", sweep["report"], wv.ViewOptions(group_by=("nope",)), keys=logged)
    with pytest.raises(ValueError, match="--wandb-group"):
        no_group = sweep["report"].table.assign(group=pd.NA)
        wv.sweep_group(no_group)
