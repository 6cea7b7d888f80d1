"""Read a W&B run back from its local ``run-<id>.wandb`` file (offline or online runs alike).

wandb 0.31 writes no ``wandb-summary.json`` or ``config.yaml`` for offline runs, and its old
Python reader is gone, so we parse the transaction log ourselves (environment.md §2.2):

* a 7-byte file header: ``b":W&B"``, a 2-byte magic, a 1-byte version;
* then LevelDB-log framing in 32 KiB blocks (counted from the start of the file): each chunk has
  a 7-byte header (CRC32C ``<I``, length ``<H``, type ``B``) and a payload; type 1 is a whole
  record, 2/3/4 the first/middle/last piece of one spanning blocks; a block's tail shorter than a
  chunk header is zero padding;
* each reassembled record is a ``wandb.proto.wandb_internal_pb2.Record`` protobuf.

This is wandb's internal format: if a wandb upgrade changes it, the tests reading runs back fail
first. The CRC is not checked (CRC32C is not in the standard library); a truncated tail (a killed
run) ends the read without an error.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Iterator

FILE_MAGIC = b":W&B"
FILE_HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_raw_records(path: str | Path) -> Iterator[bytes]:
    """Serialized ``Record`` protobufs of a ``.wandb`` file, in write order."""
    data = Path(path).read_bytes()
    if data[:4] != FILE_MAGIC:
        raise ValueError(f"{path}: not a W&B run file (no {FILE_MAGIC!r} header)")
    pos, pieces = FILE_HEADER, bytearray()
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # zero padding at the end of a block
            pos += room
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += CHUNK_HEADER
        if kind == 0 and length == 0:  # preallocated, never written
            break
        payload = data[pos:pos + length]
        if len(payload) < length:  # truncated by a crash
            break
        pos += length
        if kind == FULL:
            yield bytes(payload)
        elif kind == FIRST:
            pieces = bytearray(payload)
        elif kind == MIDDLE:
            pieces += payload
        elif kind == LAST:
            pieces += payload
            yield bytes(pieces)
            pieces = bytearray()


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _items(items: Any) -> dict[str, Any]:
    return {_key(i): json.loads(i.value_json) for i in items}


def find_run_file(path: str | Path) -> Path:
    """The ``run-*.wandb`` file of a run directory (``.../wandb/offline-run-*``), or ``path`` itself."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected one run-*.wandb file, found {len(files)}")
    return files[0]


def run_dirs(save_dir: str | Path) -> list[Path]:
    """Local run directories under ``<save_dir>/wandb`` (offline and online), oldest first."""
    root = Path(save_dir) / "wandb"
    dirs = [d for d in root.glob("*run-*") if d.is_dir() and not d.is_symlink()]  # not latest-run

    def started(d: Path) -> str:  # "[offline-]run-<YYYYMMDD_HHMMSS>-<id>"
        found = re.search(r"run-(\d{8}_\d{6})-", d.name)
        return found.group(1) if found else d.name

    return sorted(dirs, key=started)


def read_run(path: str | Path) -> dict[str, Any]:
    """Config, history rows, summary, metric definitions and run identity of one run file.

    Returns ``{"config": {...}, "history": [{...} per logged row], "summary": {...},
    "metrics": {name or glob: step_metric}, "run": {"id", "project", "group", "name"},
    "exit_code": int | None}``.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # wandb is heavy; import on use

    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "metrics": {}, "run": {}, "exit_code": None}
    for raw in iter_raw_records(find_run_file(path)):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(_items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
            for item in rec.summary.remove:
                out["summary"].pop(_key(item), None)
        elif kind == "config":  # later updates, e.g. Lightning's log_hyperparams
            out["config"].update(_items(rec.config.update))
        elif kind == "run":  # wandb.init(config=...), and the summary of a resumed run
            r = rec.run
            out["config"].update(_items(r.config.update))
            out["summary"].update(_items(r.summary.update))
            out["run"] = {"id": r.run_id, "project": r.project, "group": r.run_group, "name": r.display_name}
        elif kind == "metric":
            m = rec.metric
            out["metrics"][m.name or m.glob_name] = m.step_metric or None
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def has_exit_record(path: str | Path) -> bool:
    """True once a run file holds its exit record (the run was finished and fully written)."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        records = list(iter_raw_records(path))
    except (OSError, ValueError):  # not created yet, or only its header so far
        return False
    for raw in reversed(records):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "exit":
            return True
    return False


def wait_until_written(path: str | Path, timeout_s: float = 30.0, poll_s: float = 0.1) -> bool:
    """Wait until the run file ``path`` holds its exit record; False after ``timeout_s``.

    ``wandb.finish()`` can return before wandb-core has written the run's records (seen under CPU
    load: the file still held only its 7-byte header), so a reader right after it, or the next
    job, could see an empty run. The exit record is written last.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while not has_exit_record(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
