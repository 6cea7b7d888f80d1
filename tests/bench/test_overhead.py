"""The interleaved callbacks-overhead benchmark: one fit, the metrics callbacks' per-step hooks gated
per block in ABBA order, one logging step per block, per-pair step-time changes into an interval."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from sectional_moe.bench import overhead
from sectional_moe.bench.cases import build_cases, parse_combos
from sectional_moe.bench.runners import timed_hooks


def test_blocks_run_in_abba_order():
    assert [overhead.block_is_on(b) for b in range(8)] == [True, False, False, True, True, False, False, True]


def test_a_gated_callback_runs_its_step_hooks_only_in_open_steps():
    gate = overhead.Gate(warmup=2, block=3)

    class Counting(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(batch_idx)

    cb, sink = Counting(), [0.0]
    timed_hooks(cb, sink, gate=lambda: gate.open)
    for i in range(2 + 4 * 3):
        gate.on_train_batch_start(None, None, None, i)
        cb.on_train_batch_end(None, None, None, None, i)
    # warm-up 0-1 open, then blocks of 3: on (2-4), off (5-7), off (8-10), on (11-13)
    assert cb.seen == [0, 1, 2, 3, 4, 11, 12, 13]
    assert gate.states == [True] * 5 + [False] * 6 + [True] * 3 and sink[0] > 0


def test_an_interleaved_fit_pairs_every_on_block_with_an_off_block():
    (case,) = [c for c in build_cases(["nano"], [4], parse_combos(["dense"]), 512)]
    res = overhead.interleaved_fit(case, batch=2, pairs=3, block=2, device=torch.device("cpu"), precision="32-true")
    assert len(res["on_block_means_s"]) == len(res["off_block_means_s"]) == 3
    assert all(t > 0 for t in res["on_block_means_s"] + res["off_block_means_s"])
    assert all(h > 0 for h in res["on_hook_s_per_step"])  # the callbacks ran in the on blocks


def test_the_quick_run_writes_a_table_with_the_interval_and_the_verdict(tmp_path):
    assert overhead.main(["--quick", "--out", str(tmp_path), "--max-s", "0"]) == 0
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert {r["label"] for r in report["results"]} == {"dense", "moe-topk-E4"}
    assert all(r["pairs"] == 2 for r in report["results"]) and "budget spent" in report["meta"]["stop"]
    text = (tmp_path / "overhead.md").read_text()
    assert "| nano/dense | 2 x 64 | 2 |" in text and "ABBA" in text
    # the command recorded is the one given to main (not pytest's), and it heads the table's conditions
    assert report["meta"]["command"] == f"python -m sectional_moe.bench.overhead --quick --out {tmp_path} --max-s 0"
    assert text.splitlines()[2].startswith(f"`{report['meta']['command']}` on ")


@pytest.mark.parametrize("argv, message", [(["--ci", "2"], "--ci 2.0"), (["--configs", "sectional-topk-E3"], "impossible"),
                                           (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)")])
def test_bad_arguments_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        overhead.main([*argv, "--out", ""])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
