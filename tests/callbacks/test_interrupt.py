"""SIGTERM and Ctrl-C outside SLURM (callbacks.preemption.InterruptCheckpoint): the first signal
asks for a checkpoint at the next step; a repeated SIGTERM changes nothing; Ctrl-C after it stops
at once."""

from __future__ import annotations

import signal

import pytest

from sectional_moe.callbacks.preemption import InterruptCheckpoint


def test_a_repeated_sigterm_keeps_the_checkpoint_and_a_ctrl_c_stops_at_once(capsys):
    cb = InterruptCheckpoint()
    cb._on_signal(signal.SIGTERM, None)
    assert cb.received == signal.SIGTERM and "saving a checkpoint after this step" in capsys.readouterr().err
    cb._on_signal(signal.SIGTERM, None)  # e.g. the study runner forwarding what the process group also got
    assert cb.received == signal.SIGTERM and capsys.readouterr().err == ""
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            cb._on_signal(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)
