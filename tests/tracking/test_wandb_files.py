"""The reader of W&B's ``run-<id>.wandb`` files: LevelDB-style framing, records across blocks, the exit record."""

from __future__ import annotations

import struct

from sectional_moe.tracking.wandb_files import BLOCK, iter_raw_records, read_run, wait_until_written


def _frame(records: list[bytes]) -> bytes:
    """Write records in the .wandb framing (LevelDB log blocks), splitting across blocks."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for rec in records:
        first = True
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < 7:
                out += b"\0" * room
                continue
            piece, rec = rec[: room - 7], rec[room - 7:]
            kind = (1 if not rec else 2) if first else (4 if not rec else 3)
            out += struct.pack("<IHB", 0, len(piece), kind) + piece
            first = False
            if not rec:
                break
    return bytes(out)


def test_run_file_reader_reassembles_records_spanning_blocks(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for i in range(3):
        rec = pb.Record()
        item = rec.summary.update.add()
        item.key, item.value_json = f"k{i}", f'"{"x" * (50_000 * i)}"'
        records.append(rec.SerializeToString())
    path = tmp_path / "run-test.wandb"
    path.write_bytes(_frame(records) + b"\0" * 100)  # a zero-filled tail ends the log
    assert list(iter_raw_records(path)) == records
    assert read_run(path)["summary"] == {f"k{i}": "x" * (50_000 * i) for i in range(3)}
    path.write_bytes(_frame(records)[:-10])  # a killed run: the last record is cut short
    assert len(list(iter_raw_records(path))) == 2


def test_a_run_file_counts_as_written_only_once_it_holds_its_exit_record(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    from sectional_moe.tracking.wandb_files import has_exit_record

    summary = pb.Record()
    summary.summary.update.add(key="k", value_json="1")
    exit_rec = pb.Record()
    exit_rec.exit.exit_code = 0
    path = tmp_path / "run-x.wandb"
    assert not has_exit_record(path)  # not created yet
    path.write_bytes(_frame([]))  # the 7-byte header wandb-core writes first
    assert not has_exit_record(path) and not wait_until_written(path, timeout_s=0.2)
    path.write_bytes(_frame([summary.SerializeToString()]))
    assert not has_exit_record(path)
    path.write_bytes(_frame([summary.SerializeToString(), exit_rec.SerializeToString()]))
    assert has_exit_record(path) and wait_until_written(path, timeout_s=0.2)
