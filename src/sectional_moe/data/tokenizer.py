"""Byte-level BPE tokenizer: trained on the train split only, cached on disk by content hash.

The cache key is a hash of the training text plus every setting that changes the result, so a
second run (or another job of a sweep) loads the JSON file in milliseconds instead of retraining,
and a changed corpus or vocabulary can never silently reuse a stale tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sectional_moe.errors import DataError
from sectional_moe.files import atomic_path

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # every byte, plus the end-of-text token
# Everything besides the text and vocab_size that changes the trained tokenizer (part of the key).
_SETTINGS = f"bytelevel-bpe|min_frequency=2|special={EOS_TOKEN}|prefix_space=False|v1"


def check_vocab_size(vocab_size: int) -> None:
    """Raise DataError unless ``vocab_size`` can hold every byte plus the EOS token."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB:
        raise DataError("data.vocab_size", f"vocab_size={vocab_size!r} is below the {MIN_VOCAB} a byte-level BPE needs (256 bytes + {EOS_TOKEN}); use e.g. data.vocab_size=8192")


def files_fingerprint(files: Iterable[str | os.PathLike]) -> str:
    """Hash of the files' contents (in the given order), not of their paths or times."""
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        h.update(b"\0file\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_cache_path(cache_dir: str | os.PathLike, corpus_fp: str, vocab_size: int) -> Path:
    """``{cache_dir}/tokenizers/{fingerprint}-bpe{vocab_size}.json``; the fingerprint covers the
    training text (``corpus_fp``) and the tokenizer settings."""
    fp = hashlib.blake2b(f"{corpus_fp}|{_SETTINGS}".encode(), digest_size=8).hexdigest()
    return Path(cache_dir).expanduser() / "tokenizers" / f"{fp}-bpe{vocab_size}.json"


def new_bpe() -> tuple[Tokenizer, Callable[[int], trainers.BpeTrainer]]:
    """An untrained GPT-2-style byte-level BPE and a factory for its trainer."""
    tok = Tokenizer(models.BPE(unk_token=None))
    # no prefix space: decode(encode(text)) == text exactly
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    def make_trainer(vocab_size: int) -> trainers.BpeTrainer:
        return trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )

    return tok, make_trainer


def train_bpe(vocab_size: int, *, files: list[str | os.PathLike] | None = None,
              texts: Callable[[], Iterator[str]] | None = None) -> Tokenizer:
    """Train a byte-level BPE on text files (fast path, read by Rust) or on an iterator of texts."""
    check_vocab_size(vocab_size)
    tok, make_trainer = new_bpe()
    if files is not None:
        tok.train([str(f) for f in files], make_trainer(vocab_size))
    elif texts is not None:
        tok.train_from_iterator(texts(), make_trainer(vocab_size))
    else:
        raise ValueError("train_bpe needs files or texts")
    return tok


def load_tokenizer_file(path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """Load a user-given tokenizer JSON file and check it fits the config.

    Raises:
        DataError: the file is missing or unreadable, has no ``<|endoftext|>`` token, or its size
            differs from ``data.vocab_size``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError("data.tokenizer_path", f"{str(p)!r} does not exist; give a tokenizers JSON file or set data.tokenizer_path=null to train one")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError("data.tokenizer_path", f"{str(p)!r} is not a tokenizers JSON file ({one_line(e)}); save one with Tokenizer.save()") from None
    if tok.token_to_id(EOS_TOKEN) is None:
        raise DataError("data.tokenizer_path", f"{str(p)!r} has no {EOS_TOKEN} token, which separates documents; add it as a special token")
    real = tok.get_vocab_size()
    if real != vocab_size:
        raise DataError("data.vocab_size", f"vocab_size={vocab_size} but the tokenizer {str(p)!r} has {real} tokens; set data.vocab_size={real}")
    return tok


def cached_bpe(cache_path: Path, vocab_size: int, train: Callable[[], Tokenizer]) -> Tokenizer:
    """Load ``cache_path`` if it exists; else run ``train()`` once (under a file lock, so
    concurrent sweep jobs train it once) and save it atomically."""
    if cache_path.is_file():
        return Tokenizer.from_file(str(cache_path))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_path) + ".lock"):
        if cache_path.is_file():
            return Tokenizer.from_file(str(cache_path))
        check_vocab_size(vocab_size)
        tok = train()
        with atomic_path(cache_path) as tmp:
            tok.save(str(tmp))
    return tok


def one_line(e: BaseException | str) -> str:
    """An exception message squeezed onto one line (error messages must be one line)."""
    return " ".join(str(e).split())[:200]
