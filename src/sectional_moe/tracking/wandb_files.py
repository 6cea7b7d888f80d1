"""Read a W&B run back from its local ``run-<id>.wandb`` file (offline or online runs alike).

wandb 0.31 writes no ``wandb-summary.json`` or ``config.yaml`` for offline runs, and its old
Python reader is gone, so we parse the transaction log ourselves (environment.md §2.2):

* a 7-byte file header: ``b":W&B"``, a 2-byte magic, a 1-byte version;
* then LevelDB-log framing in 32 KiB blocks (counted from the start of the file): each chunk has
  a 7-byte header (CRC32C ``<I``, length ``<H``, type ``B``) and a payload; type 1 is a whole
  record, 2/3/4 the first/middle/last piece of one spanning blocks; a block's tail shorter than a
  chunk header is zero padding;
* each reassembled record is a ``wandb.proto.wandb_internal_pb2.Record`` protobuf.

This is wandb's internal format, so the reader is a fallback, not a dependency: the run
directories' ``csv/metrics.csv`` (the CSV logger writes it next to every W&B run) give the report
the same table, and ``wandb`` is not pinned to the minor series the reader was written for. If a
wandb version writes files the reader cannot parse (or has no ``wandb.proto``), it raises
:class:`RunFileUnreadable` with one line that says so and where the same metrics are, and
:func:`wait_until_written` stops waiting. The CRC is not checked (CRC32C is not in the standard
library); a truncated tail (a killed run) ends the read without an error.
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


class RunFileUnreadable(ValueError):
    """The installed wandb writes (or describes) run files this reader cannot parse."""


def _record_class(path: str | Path) -> Any:
    """wandb's ``Record`` protobuf class, or :class:`RunFileUnreadable` naming the way out."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb  # wandb is heavy; import on use
    except Exception as err:  # noqa: BLE001 - no wandb, or a wandb without this module
        raise RunFileUnreadable(_unreadable(path, f"no wandb.proto.wandb_internal_pb2 ({type(err).__name__})")) from None
    return pb.Record


def _unreadable(path: str | Path, why: str) -> str:
    try:
        import wandb

        version = getattr(wandb, "__version__", "?")
    except Exception:  # noqa: BLE001
        version = "not installed"
    return (f"{path}: cannot read this W&B run file with wandb {version} ({why}); the run directory's csv/metrics.csv "
            "holds the same metrics: point the report at the run directories instead")


def _parse(record_class: Any, raw: bytes, path: str | Path) -> Any:
    rec = record_class()
    try:
        rec.ParseFromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError: another schema
        raise RunFileUnreadable(_unreadable(path, f"{type(err).__name__}: {err}")) from None
    return rec


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
    record_class = _record_class(path)
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "metrics": {}, "run": {}, "exit_code": None}
    for raw in iter_raw_records(find_run_file(path)):
        rec = _parse(record_class, raw, path)
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
    """True once a run file holds its exit record (the run was finished and fully written).

    Raises:
        RunFileUnreadable: the installed wandb's files cannot be parsed by this reader.
    """
    record_class = _record_class(path)
    try:
        records = list(iter_raw_records(path))
    except (OSError, ValueError):  # not created yet, or only its header so far
        return False
    for raw in reversed(records):
        rec = _parse(record_class, raw, path)
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
    try:
        while not has_exit_record(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)
    except RunFileUnreadable:  # another wandb: nothing to wait for that this reader could see
        return True
    return True
