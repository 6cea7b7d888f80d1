"""The malloc_reuse benchmark's plumbing: every case trained by both sides in alternating order, paired
per round into a change with its interval. The allocator's real effect (no page faults when a freed
buffer is allocated again) is checked in tests/training/test_fast_path.py; timing is the benchmark's."""

from __future__ import annotations

import pytest

from sectional_moe import device as dev
from sectional_moe.bench import allocator, fresh


def test_each_round_pairs_both_sides_of_every_case_and_alternates_their_order(monkeypatch):
    calls: list[tuple[str, int]] = []

    def in_process(fn, args):  # spawned children would not see the fakes below
        calls.append(args[:2])
        return fn(*args)

    monkeypatch.setattr(fresh, "run_in_fresh_process", in_process)
    monkeypatch.setattr(allocator, "reuse_host_memory", lambda value, device: dev.HostMallocChoice(bool(value), "fake"))
    for key in dev.HOST_MALLOC_USER_ENV:
        monkeypatch.delenv(key, raising=False)
    report = allocator.run(rounds=3, warmup=0, steps=2, threads=1, quick=True, log=lambda msg: None)
    assert calls == [("system", 0), ("reuse", 0), ("reuse", 0), ("system", 0), ("system", 0), ("reuse", 0)]
    (row,) = report["results"]
    assert len(row["round_medians_system_s"]) == len(row["round_medians_reuse_s"]) == 3
    low, high = row["step_time_change_ci95"]
    assert low <= row["step_time_change"] <= high and row["speedup"] == pytest.approx(1 / (1 + row["step_time_change"]))
    text = allocator.to_markdown(report)
    assert "| reference (dense, nano) | 2 x 64 |" in text and "3 rounds x 0+2 steps" in text


def test_a_users_allocator_settings_are_refused_before_any_run(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    with pytest.raises(SystemExit, match="unset LD_PRELOAD"):
        allocator.run(rounds=1, warmup=0, steps=1, threads=1, quick=True, log=lambda msg: None)
