"""The LightningDataModule: corpus -> tokenizer -> packed blocks -> resumable, sharded loaders.

Built from the Hydra ``data`` node: ``LMDataModule(**cfg.data, seq_len=..., cache_dir=..., seed=...)``.
Usable without a Trainer (``prepare_data(); setup("fit")``), because the model needs the
tokenizer's real ``vocab_size`` before it is built. Every user-fixable problem (missing file, empty
or too-short split, unknown source, bad vocabulary, uncached hub dataset offline) raises
:class:`~sectional_moe.errors.DataError` from the constructor or ``prepare_data``, before training.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from sectional_moe.data import loading
from sectional_moe.data.corpus import DEFAULT_TEST_PLAYS, DEFAULT_VAL_PLAYS, SPLITS, write_shakespeare
from sectional_moe.data.textfiles import prepare_text_files
from sectional_moe.data.sampler import ResumableDataLoader, ShardedSampler, batches_per_epoch, dist_rank_world
from sectional_moe.data.tokenizer import (
    EOS_TOKEN, cached_bpe, check_vocab_size, files_fingerprint, load_tokenizer_file, tokenizer_cache_path, train_bpe,
)
from sectional_moe.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("shakespeare", "text_files", "hub")
DEFAULT_HUB_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
_SPLIT_ALIASES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def default_cache_dir() -> Path:
    """``$SECTIONAL_MOE_CACHE``, else ``~/.cache/sectional_moe`` (as ``conf/paths/default.yaml``)."""
    return Path(os.environ.get("SECTIONAL_MOE_CACHE") or Path.home() / ".cache" / "sectional_moe")


@dataclass
class _Split:
    tokens: datasets.Dataset  # one row per document: input_ids (EOS-terminated), uncapped
    blocks: datasets.Dataset  # one row per block of seq_len+1 tokens, after the token cap
    num_tokens: int  # tokens in the (capped) stream the blocks were cut from


class LMDataModule(pl.LightningDataModule):
    """Train/validation/test token blocks of ``seq_len + 1`` tokens, batched as int64 (B, seq_len+1).

    Args (the ``data`` config keys; see ``conf/data/*.yaml`` for the documented defaults):
        source: ``shakespeare`` (embedded corpus), ``text_files`` (local files) or ``hub`` (HF datasets).
        name: label for dashboards; defaults to the source (or the hub path).
        vocab_size: BPE vocabulary to train (>= 257), or the size of ``tokenizer_path``'s tokenizer.
        tokenizer_path: an existing ``tokenizers`` JSON file to use instead of training one.
        val_plays, test_plays: held-out plays (``shakespeare``); every other play trains.
        train_files, val_files, test_files: paths or globs (``text_files``); test defaults to val.
        sample_by: what one document is in a text file: ``document`` (the file), ``paragraph``, ``line``.
        encoding: the text files' encoding (``text_files``); files in another one are refused with
            the file and byte named, files in a non-UTF-8 one are transcoded into the cache.
        hub_path, hub_name: ``load_dataset(hub_path, hub_name)``; a hub id or a local dataset dir.
        hub_splits: our split -> the dataset's split expression (``"train[:98%]"`` works).
        hub_cache_dir: datasets cache for hub data; ``None`` = datasets' default (``$HF_HOME``).
        text_field: the text column of a hub dataset.
        batch_size: train blocks per batch per device; eval_batch_size: the same for val/test
            (``None`` = batch_size).
        num_workers: DataLoader worker processes (0: load in the main process); ``auto``: 0 on CPU
            (in-memory blocks: a worker costs more than it saves), a few per GPU on CUDA.
        pin_memory: ``auto`` (on when CUDA is available), ``True`` or ``False``.
        max_train_tokens, max_eval_tokens: cut each split's token stream (quick runs, tests).
        seq_len: tokens per training sequence (a block holds one more: the last target).
        cache_dir: root of our caches (corpus text, tokenizers, datasets' Arrow files).
        seed: seed of the training order (which depends only on seed and epoch).
    """

    def __init__(
        self,
        *,
        seq_len: int,
        source: str = "shakespeare",
        name: str | None = None,
        vocab_size: int = 8192,
        tokenizer_path: str | None = None,
        val_plays: list[str] | tuple[str, ...] = DEFAULT_VAL_PLAYS,
        test_plays: list[str] | tuple[str, ...] = DEFAULT_TEST_PLAYS,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        sample_by: str = "document",
        encoding: str = "utf-8",
        hub_path: str | None = None,
        hub_name: str | None = None,
        hub_splits: dict[str, str] | None = None,
        hub_cache_dir: str | None = None,
        text_field: str = "text",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        pin_memory: bool | str = "auto",
        max_train_tokens: int | None = None,
        max_eval_tokens: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        **unknown: Any,
    ):
        super().__init__()
        unknown.pop("_target_", None)
        if unknown:
            raise DataError(f"data.{sorted(unknown)[0]}", f"unknown data option(s) {sorted(unknown)}; known: {', '.join(sorted(_KNOWN_KEYS))}")
        if source not in SOURCES:
            raise DataError("data.source", f"source={source!r} is unknown; use one of {', '.join(SOURCES)} (data=shakespeare | text_files | hub | wikitext103)")
        if tokenizer_path is None:
            check_vocab_size(vocab_size)
        _check_int("size.seq_len", seq_len, 1)
        _check_int("data.batch_size", batch_size, 1)
        if num_workers != "auto":
            _check_int("data.num_workers", num_workers, 0)
        _check_int("data.eval_batch_size", eval_batch_size, 1, optional=True)
        _check_int("data.max_train_tokens", max_train_tokens, 2, optional=True)
        _check_int("data.max_eval_tokens", max_eval_tokens, 2, optional=True)
        if pin_memory not in (True, False, "auto"):
            raise DataError("data.pin_memory", f"pin_memory={pin_memory!r}; use auto, true or false")
        if sample_by not in loading.SAMPLE_BY:
            raise DataError("data.sample_by", f"sample_by={sample_by!r}; use one of {', '.join(loading.SAMPLE_BY)}")

        self.source = source
        self.seq_len = int(seq_len)
        self.vocab_size_requested = vocab_size
        self.tokenizer_path = tokenizer_path
        self.val_plays, self.test_plays = list(val_plays or []), list(test_plays or [])
        self.sample_by = sample_by
        self.hub_path, self.hub_name, self.hub_cache_dir, self.text_field = hub_path, hub_name, hub_cache_dir, text_field
        self.hub_splits = dict(hub_splits or DEFAULT_HUB_SPLITS)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = auto_num_workers() if num_workers == "auto" else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.max_train_tokens, self.max_eval_tokens = max_train_tokens, max_eval_tokens
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.seed = int(seed)

        self._files: dict[str, list[str]] | None = None  # text sources: split -> files
        if source == "text_files":
            train = _resolve_files(train_files, "data.train_files", required=True)
            val = _resolve_files(val_files, "data.val_files", required=True)
            test = _resolve_files(test_files, "data.test_files", required=False)
            if test is None:
                log.warning("data.test_files is null: the test split reuses the validation files")
            self.encoding = encoding
            train, val = (prepare_text_files(f, k, encoding, self.cache_dir) for f, k in ((train, "data.train_files"), (val, "data.val_files")))
            test = prepare_text_files(test, "data.test_files", encoding, self.cache_dir) if test is not None else None
            self._files = {"train": train, "validation": val, "test": test or val}
        elif source == "hub":
            if not hub_path:
                raise DataError("data.hub_path", "required for source=hub; e.g. data.hub_path=wikitext data.hub_name=wikitext-103-raw-v1")
            missing = [s for s in SPLITS if not self.hub_splits.get(s)]
            if missing:
                raise DataError("data.hub_splits", f"no dataset split given for {missing}; e.g. data.hub_splits.validation='train[98%:]'")
        self.name = name or (source if source != "hub" else "/".join(x for x in (hub_path, hub_name) if x))

        self._tokenizer: Tokenizer | None = None
        self._tokenizer_file: Path | None = None
        self._raw: dict[str, datasets.Dataset] | None = None
        self._splits: dict[str, _Split] = {}
        self._baseline_ppl: dict[tuple[str, str], float] = {}  # (kind, split) -> perplexity, computed once
        self._baselines: dict[str, Any] = {}  # the fitted count baselines, built on first use

    # ----------------------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Write the corpus, train or load the tokenizer, tokenize and pack every split (all cached on
        disk; a second call, in this process or the next, only reloads). Raises DataError early."""
        self._build()

    def setup(self, stage: str | None = None) -> None:
        """Load the prepared splits (cache hits; on every DDP rank)."""
        self._build()

    def _text_files(self) -> dict[str, list[str]]:
        if self._files is None:
            assert self.source == "shakespeare"
            written = write_shakespeare(self.cache_dir, self.val_plays, self.test_plays)
            self._files = {s: [str(p) for p in files] for s, files in written.items()}
        return self._files

    def _raw_splits(self) -> dict[str, datasets.Dataset]:
        if self._raw is None:
            if self.source == "hub":
                self._raw = loading.load_hub(str(self.hub_path), self.hub_name, {s: self.hub_splits[s] for s in SPLITS},
                                             cache_dir=self.hub_cache_dir)
            else:
                self._raw = loading.load_text_files(self._text_files(), sample_by=self.sample_by,
                                                    cache_dir=self.cache_dir / "datasets")
        return self._raw

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loaded from its cache file, or trained on the train split the first time)."""
        if self._tokenizer is None:
            if self.tokenizer_path:
                self._tokenizer = load_tokenizer_file(self.tokenizer_path, self.vocab_size_requested)
                self._tokenizer_file = Path(self.tokenizer_path).expanduser()
            elif self.source == "hub":
                train = self._raw_splits()["train"]
                if self.text_field not in train.column_names:
                    raise DataError("data.text_field", f"text_field={self.text_field!r} is not a column of {self.name}; columns: {train.column_names}")
                self._tokenizer_file = tokenizer_cache_path(self.cache_dir, f"hub|{train._fingerprint}|{self.text_field}", self.vocab_size_requested)
                self._tokenizer = cached_bpe(self._tokenizer_file, self.vocab_size_requested,
                                             lambda: train_bpe(self.vocab_size_requested, texts=lambda: _iter_texts(train, self.text_field)))
            else:
                files = self._text_files()["train"]
                if not any(_has_text(f) for f in files):
                    raise DataError(self._split_key("train"), f"the train text is empty ({len(files)} file(s) with only whitespace); give files with text")
                self._tokenizer_file = tokenizer_cache_path(self.cache_dir, f"files|{files_fingerprint(files)}", self.vocab_size_requested)
                self._tokenizer = cached_bpe(self._tokenizer_file, self.vocab_size_requested,
                                             lambda: train_bpe(self.vocab_size_requested, files=files))
        return self._tokenizer

    @property
    def tokenizer_file(self) -> Path:
        """Where the tokenizer JSON lives (the cache file, or ``tokenizer_path``)."""
        _ = self.tokenizer  # loads (or trains) it and records its file
        assert self._tokenizer_file is not None
        return self._tokenizer_file

    @property
    def vocab_size(self) -> int:
        """The tokenizer's real vocabulary size (what the model's embedding must have)."""
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``, appended after every document."""
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        assert eos is not None
        return eos

    def _build(self) -> None:
        if len(self._splits) == len(SPLITS):
            return
        tok, eos = self.tokenizer, self.eos_id
        tok_fp = files_fingerprint([self.tokenizer_file])
        raw = self._raw_splits()
        for split in SPLITS:
            key, cap = self._split_key(split), self._cap(split)
            tokens = loading.tokenize(raw[split], tok, text_field=self.text_field if self.source == "hub" else "text",
                                      eos_id=eos, tokenizer_fp=tok_fp)
            n = loading.num_tokens(tokens)
            if n == 0:
                raise DataError(key, f"the {split} split is empty (no non-blank document); give it some text")
            n = min(n, cap) if cap else n
            if n < self.seq_len + 1:
                capped = cap is not None and cap < self.seq_len + 1
                fix = (f"raise data.{'max_train_tokens' if split == 'train' else 'max_eval_tokens'} (or set it to null)" if capped
                       else "give it more text or use a smaller size.seq_len")
                raise DataError(f"data.{'max_train_tokens' if split == 'train' else 'max_eval_tokens'}" if capped else key,
                                f"the {split} split has {n} tokens, fewer than the seq_len+1={self.seq_len + 1} one block needs; {fix}")
            blocks = loading.pack(tokens, seq_len=self.seq_len, max_tokens=cap)
            self._splits[split] = _Split(tokens=tokens, blocks=blocks, num_tokens=n)
        n_train = len(self._splits["train"].blocks)
        if n_train < self.batch_size:
            raise DataError("data.batch_size", f"the train split has {n_train} blocks of {self.seq_len + 1} tokens, fewer than "
                            f"batch_size={self.batch_size}: not one full batch; lower data.batch_size or give more train text")

    def _cap(self, split: str) -> int | None:
        return self.max_train_tokens if split == "train" else self.max_eval_tokens

    def _split_key(self, split: str) -> str:
        """The config key that decides what goes into ``split`` (named in error messages)."""
        if self.source == "shakespeare":
            return {"train": "data.source", "validation": "data.val_plays", "test": "data.test_plays"}[split]
        if self.source == "hub":
            return "data.hub_splits"
        if split == "test" and self._files is not None and self._files["test"] is self._files["validation"]:
            return "data.val_files"
        return {"train": "data.train_files", "validation": "data.val_files", "test": "data.test_files"}[split]

    def _split(self, split: str) -> _Split:
        name = _SPLIT_ALIASES.get(split)
        if name is None:
            raise ValueError(f"unknown split {split!r}; use train, validation or test")
        self._build()
        return self._splits[name]

    # ----------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled by (seed, epoch), sharded by rank, full batches only, resumable mid-epoch."""
        blocks = self._split("train").blocks
        _, world = dist_rank_world()
        if batches_per_epoch(len(blocks), self.batch_size, world) == 0:
            raise DataError("data.batch_size", f"the train split has {len(blocks)} blocks for {world} ranks, fewer than "
                            f"batch_size={self.batch_size} per rank; lower data.batch_size or give more train text")
        sampler = ShardedSampler(len(blocks), shuffle=True, seed=self.seed)
        return ResumableDataLoader(loading.BlockDataset(blocks), batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                   collate_fn=loading.collate_blocks, **self._loader_kwargs())

    def _eval_loader(self, split: str) -> DataLoader:
        blocks = self._split(split).blocks
        _, world = dist_rank_world()
        if len(blocks) < world:
            raise DataError(self._split_key(split), f"the {split} split has {len(blocks)} blocks, fewer than the {world} ranks; give it more text")
        # fixed order; each rank a disjoint equal shard, so NLL and token sums over ranks are exact
        sampler = ShardedSampler(len(blocks), shuffle=False)
        return DataLoader(loading.BlockDataset(blocks), batch_size=self.eval_batch_size, sampler=sampler, drop_last=False,
                          collate_fn=loading.collate_blocks, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict[str, Any]:
        """Worker and pinning knobs shared by every loader. Workers persist across epochs and
        validations (re-forking them each time stalls the device), and prefetch a few batches each."""
        kw: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=4)
        return kw

    def val_dataloader(self) -> DataLoader:
        """Validation blocks in order (no shuffle), sharded by rank."""
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        """Test blocks in order (no shuffle), sharded by rank."""
        return self._eval_loader("test")

    # ----------------------------------------------------------------------------- statistics
    def num_tokens(self, split: str = "train") -> int:
        """Tokens (EOS included, after the token cap) in a split's stream."""
        return self._split(split).num_tokens

    def num_blocks(self, split: str = "train") -> int:
        """Blocks of ``seq_len + 1`` tokens in a split (each holds ``seq_len`` targets)."""
        return len(self._split(split).blocks)

    def _train_stream(self) -> np.ndarray:
        """The train split's token stream (after the token cap), as the baselines are fitted on it."""
        return loading.flat_tokens(loading.token_column(self._split("train").tokens), self.max_train_tokens)

    def _eval_blocks(self, split: str) -> np.ndarray:
        """``split``'s blocks (n, seq_len + 1): column t predicts column t + 1."""
        return np.asarray(self._split(split).blocks.with_format("numpy")[:]["input_ids"])

    def baselines(self) -> dict[str, Any]:
        """The count baselines fitted on the train tokens (once): ``{"unigram": ..., "bigram": ...}``,
        each with ``nll(blocks)``, the summed NLL of a batch's targets. The LightningModule and
        ``evaluate.py`` score them on exactly the blocks the model is scored on."""
        if not self._baselines:
            stream = self._train_stream()
            self._baselines = {"unigram": loading.UnigramBaseline(np.bincount(stream, minlength=self.vocab_size)),
                               "bigram": loading.BigramBaseline(stream, self.vocab_size)}
        return self._baselines

    def _baseline_split_ppl(self, kind: str, split: str) -> float:
        key = (kind, split)
        if key not in self._baseline_ppl:
            blocks = self._eval_blocks(split)
            self._baseline_ppl[key] = float(np.exp(self.baselines()[kind].nll(blocks) / blocks[:, 1:].size))
        return self._baseline_ppl[key]

    def unigram_ppl(self, split: str = "validation") -> float:
        """Perplexity on the whole ``split`` of the add-one smoothed unigram model of the train tokens:
        the baseline a trained LM must beat by a wide margin."""
        return self._baseline_split_ppl("unigram", split)

    def bigram_ppl(self, split: str = "validation") -> float:
        """Perplexity on the whole ``split`` of the smoothed bigram model of the train tokens
        (:class:`loading.BigramBaseline`): the level of adjacent-token statistics."""
        return self._baseline_split_ppl("bigram", split)

    def describe(self) -> dict[str, Any]:
        """Flat summary for the run config: source, vocabulary, tokens and blocks per split."""
        out: dict[str, Any] = {"source": self.source, "name": self.name, "vocab_size": self.vocab_size,
                               "tokenizer": str(self.tokenizer_file), "seq_len": self.seq_len,
                               "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for split in SPLITS:
            out[f"tokens_{split}"] = self.num_tokens(split)
            out[f"blocks_{split}"] = self.num_blocks(split)
        out["unigram_ppl_validation"] = round(self.unigram_ppl("validation"), 2)
        out["bigram_ppl_validation"] = round(self.bigram_ppl("validation"), 2)
        return out


# the `data` config keys (seq_len, cache_dir and seed come from elsewhere in the config)
_KNOWN_KEYS = frozenset(p.name for p in inspect.signature(LMDataModule.__init__).parameters.values()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY) - {"seq_len", "cache_dir", "seed"}


def auto_num_workers() -> int:
    """``num_workers: auto``: 0 without CUDA; with CUDA, up to 4 per visible GPU within the CPU count,
    so host-side batching and pinning overlap the device's step."""
    if not torch.cuda.is_available():
        return 0
    per_gpu = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
    return max(1, min(4, per_gpu - 1))


def _check_int(key: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(key, f"{key.split('.')[-1]}={value!r} must be an integer >= {minimum}" + (" or null" if optional else ""))


def _resolve_files(value: str | list[str] | None, key: str, *, required: bool) -> list[str] | None:
    """Paths or globs -> existing absolute file paths (relative ones are from the launch directory)."""
    if value is None or value == [] or value == "":
        if required:
            raise DataError(key, "required for data=text_files; e.g. " + key + "=[path/to/text.txt] (paths or globs)")
        return None
    out: list[str] = []
    for entry in [value] if isinstance(value, (str, os.PathLike)) else list(value):
        path = os.path.expanduser(str(entry))
        if glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(key, f"the pattern {path!r} matches no file (cwd {os.getcwd()}); fix the glob")
            out.extend(os.path.abspath(p) for p in matches)
        elif os.path.isdir(path):
            raise DataError(key, f"{path!r} is a directory; list its files or use a glob such as {os.path.join(path, '*.txt')!r}")
        elif not os.path.isfile(path):
            raise DataError(key, f"{path!r} does not exist (cwd {os.getcwd()}); give existing text files")
        else:
            out.append(os.path.abspath(path))
    return out


def _has_text(path: str) -> bool:
    """True if the file holds a non-whitespace byte (reads only until it finds one)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if chunk.strip():
                return True
    return False


def _iter_texts(ds: datasets.Dataset, field: str, batch: int = 1000) -> Iterator[str]:
    for i in range(0, len(ds), batch):
        yield from ds[i: i + batch][field]
