"""Local text files as the tokenizer and ``datasets`` read them: checked for binary content and for
their encoding before anything reads them, and transcoded to UTF-8 when they are in another one.

The tokenizer trains on the files directly (its Rust reader takes UTF-8 only) and ``datasets``'
text builder decodes them as UTF-8: a binary or Latin-1 file would stop either with a traceback
that names no file. :func:`prepare_text_files` names the file and the byte instead, and with
``data.encoding=latin-1`` (any codec Python knows) writes a UTF-8 copy into the cache, keyed by
the file's content and the encoding, which the rest of the pipeline then reads.

Imports: :mod:`sectional_moe.errors`, :mod:`sectional_moe.files` (standard library otherwise).
"""

from __future__ import annotations

import codecs
import hashlib
import os
from pathlib import Path

from sectional_moe.errors import DataError
from sectional_moe.files import atomic_path

CHUNK = 1 << 20
UTF8 = "utf-8"


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def check_text_file(path: str | os.PathLike, key: str, encoding: str = UTF8) -> None:
    """Raise a one-line :class:`DataError` if ``path`` holds a NUL byte (a binary file) or bytes that
    are not valid in ``encoding``; the message names the file and the byte offset.

    Raises:
        DataError: ``data.train_files: /x/a.bin looks binary (NUL byte at offset 17); ...``.
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise DataError(key, f"{path} looks binary (a NUL byte at offset {offset + nul}), not text; "
                                "give plain text files (or remove it from the list)")
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = offset - pending + err.start
                bad = (b"" if at < offset else chunk[at - offset: at - offset + 1]).hex()
                hint = (f"if it is Latin-1 or Windows text, set data.encoding=latin-1 (or cp1252), or convert it: "
                        f"iconv -f latin1 -t utf-8" if _is_utf8(encoding) else "set data.encoding to the file's encoding")
                raise DataError(key, f"{path} is not valid {encoding} at byte {at}" + (f" (0x{bad})" if bad else "") +
                                f"; {hint}") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(key, f"{path} ends in the middle of a {encoding} character (byte {offset}); "
                            "the file is truncated or not in that encoding (data.encoding)") from None


def prepare_text_files(files: list[str], key: str, encoding: str, cache_dir: str | os.PathLike) -> list[str]:
    """Check every file (:func:`check_text_file`); return the files to read: the same for UTF-8,
    else UTF-8 copies in ``{cache_dir}/transcoded/`` (made once per content and encoding)."""
    for path in files:
        check_text_file(path, key, encoding)
    if _is_utf8(encoding):
        return files
    out = []
    for path in files:
        h = hashlib.blake2b(digest_size=10)
        h.update(codecs.lookup(encoding).name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        target = Path(cache_dir).expanduser() / "transcoded" / f"{h.hexdigest()}-{Path(path).stem[:40]}.txt"
        if not target.is_file():
            with atomic_path(target) as tmp, open(path, encoding=encoding, newline="") as src, \
                    open(tmp, "w", encoding=UTF8, newline="") as dst:
                while text := src.read(CHUNK):
                    dst.write(text)
        out.append(str(target))
    return out
