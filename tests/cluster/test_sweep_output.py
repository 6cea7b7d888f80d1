"""A sweep's console output is one readable block per job ending in its ``final:`` line (issue 19):
no W&B banners or run-history tables, no Lightning hints, no message printed twice."""

from __future__ import annotations

import os
import re

from tests.conftest import REPO, run_train_cli


def test_each_sweep_job_is_one_block_ending_in_its_final_line(tmp_path):
    args = ["-m", "experts=2,4", "size=nano", "data.vocab_size=512", "data.batch_size=8", "trainer=cpu", "trainer.max_steps=4",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "optim.warmup_steps=1", "logger=[wandb,csv]",
            "logger.wandb.mode=offline", "group=quiet", f"paths.log_dir={tmp_path / 'out'}"]
    proc = run_train_cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "false"},
                         timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert not [ln for ln in out.splitlines() if ln.startswith("wandb:")], out[-3000:]
    for noise in ("litlogger", "`srun` command", "anonymous setting", "Modules in train mode", "GPU available"):
        assert noise not in out, noise
    lines = proc.stdout.splitlines()
    starts = [i for i, ln in enumerate(lines) if re.search(r"\[HYDRA\]\s+#\d+ :", ln)]
    ends = [i for i, ln in enumerate(lines) if ln.startswith("final: [")]
    assert len(starts) == len(ends) == 2 and starts[0] < ends[0] < starts[1] < ends[1], proc.stdout[-3000:]
    block = lines[starts[1] + 1: ends[1]]
    assert len(block) <= 8, "\n".join(block)  # a handful of lines: threads, the run line, progress
    assert len(set(lines)) == len(lines) or all(lines.count(ln) == 1 for ln in lines if "INFO" in ln)
    assert os.path.isdir(tmp_path / "out" / "train" / "multirun" / "quiet")
