"""Local text files that are not UTF-8 text (issue 19, fault 9): binary or Latin-1 files are named with
the offending byte before anything reads them; ``data.encoding`` reads them as what they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from sectional_moe.data import LMDataModule
from sectional_moe.data.textfiles import check_text_file, prepare_text_files
from sectional_moe.errors import DataError
from sectional_moe.training import run as train_mod
from tests.training.test_bad_input import expect_one_line, no_compute  # noqa: F401 - fixture

PROSE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40


def _files(tmp_path: Path, train: bytes, val: bytes | None = None) -> tuple[Path, Path]:
    (tmp_path / "train.txt").write_bytes(train)
    (tmp_path / "val.txt").write_bytes(val if val is not None else PROSE.encode())
    return tmp_path / "train.txt", tmp_path / "val.txt"


def test_a_latin1_file_is_named_with_its_byte_offset(compose, capsys, no_compute, tmp_path):
    text = PROSE + "Le café était fermé."
    train, val = _files(tmp_path, text.encode("latin-1"))
    cfg = compose("data=text_files", f"data.train_files=[{train}]", f"data.val_files=[{val}]")
    line = expect_one_line(capsys, lambda: train_mod.main(cfg))
    offset = len(PROSE.encode()) + len("Le caf")
    assert line == (f"error: data.train_files: {train} is not valid utf-8 at byte {offset} (0xe9); if it is Latin-1 or "
                    "Windows text, set data.encoding=latin-1 (or cp1252), or convert it: iconv -f latin1 -t utf-8")


def test_a_binary_file_is_named_with_its_byte_offset(compose, capsys, no_compute, tmp_path):
    train, val = _files(tmp_path, PROSE.encode(), b"GIF89a\x01\x00\x00\xff")
    cfg = compose("data=text_files", f"data.train_files=[{train}]", f"data.val_files=[{val}]")
    line = expect_one_line(capsys, lambda: train_mod.main(cfg))
    assert line.startswith(f"error: data.val_files: {val} looks binary (a NUL byte at offset 7)"), line


def test_offsets_are_exact_across_read_chunks(tmp_path, monkeypatch):
    from sectional_moe.data import textfiles

    monkeypatch.setattr(textfiles, "CHUNK", 7)  # a multi-byte character split between two reads
    path = tmp_path / "t.txt"
    path.write_bytes("abcdeé".encode() + b"xyz\xffq")  # é is 2 bytes at offsets 5-6; 0xff at 10
    with pytest.raises(DataError, match=r"at byte 10 \(0xff\)"):
        check_text_file(path, "data.train_files")
    path.write_bytes("abcdeé".encode()[:-1])  # cut in the middle of é
    with pytest.raises(DataError, match="ends in the middle of a utf-8 character"):
        check_text_file(path, "data.train_files")


def test_encoding_key_reads_latin1_files_through_a_cached_utf8_copy(tmp_path):
    text = PROSE + "Le café était fermé; ¿qué pasó? Straße. " * 20
    train, val = _files(tmp_path, text.encode("latin-1"), text.encode("latin-1"))
    dm = LMDataModule(source="text_files", train_files=[str(train)], val_files=[str(val)], encoding="latin-1", vocab_size=300,
                      seq_len=16, batch_size=2, cache_dir=tmp_path / "cache")
    dm.prepare_data()
    copy = Path(dm._text_files()["train"][0])
    assert copy.parent == tmp_path / "cache" / "transcoded" and copy.read_text(encoding="utf-8") == text
    tok = dm.tokenizer
    assert tok.decode(tok.encode("Le café").ids) == "Le café"
    mtime = copy.stat().st_mtime_ns
    assert prepare_text_files([str(train)], "data.train_files", "latin-1", tmp_path / "cache") == [str(copy)]
    assert copy.stat().st_mtime_ns == mtime  # made once per content and encoding
