"""``studies dry-run`` says what it is doing (issue 19: it was silent for 27 s)."""

from __future__ import annotations

from sectional_moe.studies.catalog import load_study
from sectional_moe.studies.runner import dry_run


def test_dry_run_reports_each_job_before_composing_it():
    study = load_study("seq_reduction")
    lines: list[str] = []
    rows = dry_run(study, "cpu", peak_tflops=1.0, ends_only=True, progress=lines.append)
    assert len(lines) == len(rows) > 0
    assert lines[0].startswith(f"[1/{len(rows)}] composing and validating ") and lines[-1].startswith(f"[{len(rows)}/{len(rows)}]")


def test_measuring_the_cpu_peak_is_announced(monkeypatch):
    import sectional_moe.hardware as hardware

    class Enough(Exception):
        pass

    def first_job_is_enough(line: str) -> None:
        lines.append(line)
        if line.startswith("[1/"):
            raise Enough

    monkeypatch.setattr(hardware, "peak_flops", lambda *a, **k: hardware.Peak(2e11, "test"))
    lines: list[str] = []
    try:
        dry_run(load_study("seq_reduction"), "cpu", ends_only=True, progress=first_job_is_enough)
    except Enough:
        pass
    assert lines[0].startswith("measuring this CPU's matmul peak") and lines[1].startswith("[1/")
