"""Files: where the project's own files are, and crash-safe writes.

:data:`REPO_ROOT` is the checkout the package runs from (``pip install -e .``): ``conf/`` (the
Hydra configs) and ``experiments/`` (the road-map studies) are read from there.

Crash-safe writes: a reader sees the old file or the new one, never half of one. Every file that another process may read while it is written (status files, the recorded config,
the W&B id, the CPU probe cache, the tokenizer, the corpus, checkpoints) goes through
:func:`atomic_path`: write a temporary file in the same directory, ``fsync`` it, ``os.replace`` it
onto the target, ``fsync`` the directory.

Imports: the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]  # src/sectional_moe/files.py -> the checkout
CONF_DIR = REPO_ROOT / "conf"
STUDIES_DIR = REPO_ROOT / "experiments"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, durable: bool = True,
                before_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an error, move it onto ``path``.

    Args:
        directory: the temporary path is a fresh directory (e.g. a corpus of several files);
            ``path`` must not exist yet (directories are not replaced over an existing one).
        durable: ``fsync`` the file before the rename and the directory after it.
        before_replace: called with the finished temporary path just before the rename (e.g. to
            stamp a checksum or keep the previous file).

    On an error (or a ``KeyboardInterrupt``) the temporary path is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if before_replace is not None:
            before_replace(tmp)
        if durable and not directory:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, durable: bool = True) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``path``."""
    with atomic_path(path, durable=durable) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)
