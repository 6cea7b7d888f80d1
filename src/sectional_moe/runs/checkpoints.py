"""Crash-safe checkpoints: atomic writes, an integrity stamp, a kept previous ``last.ckpt``, safe loads.

Writing (:class:`AtomicCheckpointIO`, a Lightning ``CheckpointIO`` plugin installed by ``train.py``):

1. ``torch.save`` into a temporary file next to the target (same file system, so the rename is atomic);
2. stamp it: a CRC-32 of the file's bytes goes into the ZIP archive's comment (torch checkpoints are
   ZIP files; a comment is part of the format, so ``torch.load`` and ``zipfile`` still read them);
3. ``fsync`` the file; if the target is ``last.ckpt`` and exists, hard-link it to ``last.ckpt.prev``
   (the previous good checkpoint survives); ``os.replace`` the temporary file onto the target;
   ``fsync`` the directory so the rename itself survives a power cut.

A ``kill -9`` at any point therefore leaves either the old or the new file, never half of one.

Reading: :func:`verify_checkpoint` recomputes the CRC (detects truncation *and* flipped bytes,
which ``torch.load`` alone does not notice) and loads with ``weights_only=True`` (no pickled code
is ever executed). :func:`select_resume_checkpoint` picks what a restarted run resumes from:
``last.ckpt`` if it verifies, else ``last.ckpt.prev`` (the corrupt file is moved aside to
``last.ckpt.corrupt`` and a warning names it), and :func:`check_compatible` refuses a checkpoint
whose model (e.g. vocabulary size) differs from the configured one, before any compute.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sectional_moe.errors import ConfigError, StorageError
from sectional_moe.files import atomic_path
from sectional_moe.runs.layout import RunDir

log = logging.getLogger(__name__)

LAST = RunDir.LAST_CKPT
PREV_SUFFIX = RunDir.PREV_SUFFIX
CORRUPT_SUFFIX = RunDir.CORRUPT_SUFFIX
_MAGIC = b"smoe-crc32:"
_EOCD_SIG = b"PK\x05\x06"  # ZIP end-of-central-directory record (22 bytes + comment)
_CHUNK = 1 << 22


class CorruptCheckpoint(Exception):
    """A checkpoint file that is truncated, altered or otherwise unreadable."""


# ------------------------------------------------------------------------------------ integrity
def _crc_of(f: Any, length: int) -> int:
    f.seek(0)
    crc, left = 0, length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def stamp(path: str | os.PathLike) -> bool:
    """Add ``smoe-crc32:<crc> size=<n>`` as the ZIP comment of a freshly written checkpoint.

    The CRC covers every byte before the comment-length field. Returns False (file unchanged) if
    the file does not end in a comment-less ZIP end record, e.g. a non-ZIP legacy format.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 22:
            return False
        f.seek(size - 22)
        if f.read(4) != _EOCD_SIG:
            return False
        f.seek(size - 2)
        if f.read(2) != b"\x00\x00":  # already has a comment: not torch's fresh output
            return False
        body = size - 2
        comment = _MAGIC + f"{_crc_of(f, body):08x} size={body}".encode()
        f.seek(body)
        f.write(struct.pack("<H", len(comment)) + comment)
        f.truncate()
    return True


def read_stamp(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(crc, covered size, comment length) recorded by :func:`stamp`; None if the file has no stamp."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = min(size, 22 + 128)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    at = tail.rfind(_MAGIC)
    if at < 2:
        return None
    comment = tail[at:]
    if struct.unpack("<H", tail[at - 2: at])[0] != len(comment):
        return None
    try:
        crc_hex, size_field = comment[len(_MAGIC):].decode().split(" size=")
        return int(crc_hex, 16), int(size_field), len(comment)
    except ValueError:
        return None


def verify_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Check the integrity stamp (if any) and load with ``weights_only=True``.

    Raises:
        CorruptCheckpoint: truncated, altered, not a checkpoint, or missing Lightning's keys.
    """
    path = Path(path)
    try:
        recorded = read_stamp(path)
        if recorded is not None:
            crc, body, comment_len = recorded
            with open(path, "rb") as f:
                actual_size = f.seek(0, os.SEEK_END) - 2 - comment_len
                if actual_size != body:
                    raise CorruptCheckpoint(f"size {actual_size} bytes, the writer recorded {body}")
                if _crc_of(f, body) != crc:
                    raise CorruptCheckpoint("CRC-32 mismatch: the file changed after it was written")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except CorruptCheckpoint:
        raise
    except Exception as err:  # torch/zip raise RuntimeError, pickle errors, OSError...
        raise CorruptCheckpoint(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CorruptCheckpoint("not a Lightning checkpoint (no state_dict)")
    return state


# ------------------------------------------------------------------------------------ writing
def _keep_previous(path: Path) -> None:
    """Give the existing ``path`` a second name, ``<path>.prev`` (a hard link: no copy)."""
    prev = path.with_name(path.name + PREV_SUFFIX)
    link_tmp = path.with_name(f".{path.name}.prev.{os.getpid()}.tmp")
    link_tmp.unlink(missing_ok=True)
    try:
        os.link(path, link_tmp)  # the old inode simply gets a second name
    except OSError:  # file systems without hard links
        shutil.copy2(path, link_tmp)
    os.replace(link_tmp, prev)


def atomic_save(checkpoint: Mapping[str, Any], path: str | os.PathLike, keep_previous: bool | None = None) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temp file, stamp, fsync, rename, fsync dir).

    ``keep_previous`` (default: only for ``last.ckpt``) first hard-links the existing file to
    ``<path>.prev`` so a good previous checkpoint exists even if the new one is later damaged.
    """
    path = Path(path)
    if keep_previous is None:
        keep_previous = path.name == LAST

    def seal(tmp: Path) -> None:
        stamp(tmp)
        if keep_previous and path.is_file():
            _keep_previous(path)

    try:
        with atomic_path(path, before_replace=seal) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
    except (OSError, RuntimeError) as err:
        full = storage_error(err, path)
        if full is None:
            raise
        raise full from None  # one line; the temporary file is gone and the previous file untouched


_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on",
                   errno.EFBIG: "the file-size limit (ulimit -f) was reached writing to"}


def storage_error(err: BaseException, path: Path) -> StorageError | None:
    """A :class:`StorageError` if ``err`` (or an error it chains, as torch's zip writer does) means the
    disk, quota or file-size limit is full; None for any other error."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
            try:
                free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
            except OSError:
                free = "free space unknown"
            kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
            return StorageError("checkpoint", f"{_STORAGE_ERRNOS[seen.errno]} {path.parent} ({free}) while saving {path.name}; "
                                f"{kept}: make room (or move paths.log_dir), then run the same command to resume")
        seen = seen.__cause__ or seen.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, stamped writes; verified, ``weights_only`` loads.

    ``preload`` hands over a checkpoint already read by :func:`select_resume_checkpoint`, so a
    resume reads (and checksums) the file once rather than twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self._preloaded: dict[str, dict[str, Any]] = {}

    def preload(self, path: str | os.PathLike, state: dict[str, Any]) -> None:
        self._preloaded[os.path.abspath(path)] = state

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is forced: a checkpoint is data, never code (whatever the caller asked for)
        state = self._preloaded.pop(os.path.abspath(path), None)
        if state is not None:
            return state
        try:
            return verify_checkpoint(path, map_location=map_location or "cpu")
        except CorruptCheckpoint as err:
            raise ConfigError("resume", f"checkpoint {path} is unreadable ({err}); point resume= at another .ckpt or use resume=never") from err


# ------------------------------------------------------------------------------------ resuming
def select_resume_checkpoint(resume: Any, run: RunDir) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint a run resumes from and its verified contents, or (None, None) to start fresh.

    ``resume=auto``: the run's ``checkpoints/last.ckpt``; if it fails verification it is
    renamed to ``last.ckpt.corrupt`` (so the next save cannot make it the "previous" one) and
    ``last.ckpt.prev`` is used. ``never``/None: start fresh. A path: that file, which must verify.

    Raises:
        ConfigError: ``resume`` names a corrupt file, or every auto candidate is corrupt.
    """
    if resume in (None, "never"):
        return None, None
    if resume != "auto":
        try:
            return str(resume), verify_checkpoint(str(resume))
        except CorruptCheckpoint as err:
            raise ConfigError("resume", f"resume={resume} is not a readable checkpoint ({err}); point resume= at another .ckpt or use resume=never") from err
    ckpt_dir = run.checkpoint_dir
    last, prev = run.last_checkpoint, run.prev_checkpoint
    if not last.is_file() and not prev.is_file():
        return None, None
    problems = []
    for candidate in (last, prev):
        if not candidate.is_file():
            continue
        try:
            state = verify_checkpoint(candidate)
        except CorruptCheckpoint as err:
            problems.append(f"{candidate.name}: {err}")
            aside = candidate.with_name(candidate.name + CORRUPT_SUFFIX)
            try:
                os.replace(candidate, aside)
            except FileNotFoundError:  # another rank of the same run moved it first
                pass
            log.warning("checkpoint %s is corrupt (%s); moved to %s%s", candidate, err, aside.name,
                        "; resuming from the previous one" if candidate == last else "")
            print(f"warning: checkpoint {candidate} is corrupt ({err}); moved aside to {aside.name}", flush=True)
            continue
        if candidate == prev:
            # the resumed run writes last.ckpt again; keep prev as it is until then
            print(f"warning: resuming from the previous checkpoint {candidate} (step {state.get('global_step')})", flush=True)
        return str(candidate), state
    raise ConfigError("resume", f"no readable checkpoint in {ckpt_dir} ({'; '.join(problems)}); "
                      "use resume=never to start over (the corrupt files were kept as *.corrupt)")


# spec keys that may differ between a checkpoint and the config: labels and loss weights, not shapes
_FREE_SPEC_KEYS = {"size", "extra", "lb_loss_coef", "z_loss_coef", "aux_loss_reduction", "init_std"}


def check_compatible(state: Mapping[str, Any], spec: Mapping[str, Any], path: str) -> None:
    """Refuse to resume a checkpoint whose model differs from the configured one.

    Raises:
        ConfigError: naming the first differing key (``data.vocab_size`` for the vocabulary).
    """
    saved = (state.get("hyper_parameters") or {}).get("spec")
    if not isinstance(saved, Mapping):
        return  # not written by this project: Lightning's own shape check will speak
    if saved.get("vocab_size") != spec.get("vocab_size"):
        raise ConfigError("data.vocab_size", f"the checkpoint {path} has vocab_size={saved.get('vocab_size')} but the tokenizer has "
                          f"{spec.get('vocab_size')}; use the checkpoint's data.vocab_size/data.tokenizer_path, or resume=never")
    for key in sorted(set(saved) | set(spec)):
        if key in _FREE_SPEC_KEYS or saved.get(key) == spec.get(key):
            continue
        raise ConfigError("resume", f"the checkpoint {path} was trained with {key}={saved.get(key)!r} but the config has "
                          f"{key}={spec.get(key)!r}; resume with the same model config, or resume=never")
