"""RNG state in checkpoints: every rank's torch, CUDA, numpy and Python random streams.

Stored as tensors, ints, floats and lists only, so a checkpoint holding them loads with
``torch.load(weights_only=True)`` (numpy's and Python's own state tuples would not). A resumed
rank continues its own random streams, so a resumed run is bit-identical to an uninterrupted one.

Imports: torch, numpy.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

RNG_KEY = "rng_states"  # checkpoint key: a list with one capture_rng_state() per rank, by rank


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and each CUDA device), numpy and Python RNG states.

    Tensors, ints, floats and lists only, so a checkpoint holding them loads with
    ``torch.load(weights_only=True)`` (numpy's and Python's own state tuples would not).
    CUDA states are read only if CUDA is in use: reading them would create a context otherwise.
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": list(internal), "gauss": py_gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only for the devices that exist here)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, indexed by rank (a collective under DDP/FSDP:
    Lightning assembles a checkpoint on all ranks, so all of them get here together)."""
    mine = capture_rng_state()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states
