"""Loading through HF ``datasets``, tokenizing, packing into blocks, and the torch view of them.

Every heavy step is a ``datasets`` operation with an explicit fingerprint, so its result is an
Arrow file in the datasets cache and a second run memory-maps it instead of recomputing:

    text files / hub ──load_dataset──> rows of text (one row = one document)
        ──.map(tokenize)──> input_ids per document, EOS appended, empty documents dropped
        ──.map(pack)──────> blocks of seq_len+1 tokens: block i = tokens[i*T : i*T + T + 1]

Consecutive blocks share one token, so each token after the first is a target exactly once and
no block runs past the end of the stream (the tail shorter than a block is dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer

from sectional_moe.data.tokenizer import one_line
from sectional_moe.errors import DataError

_TOKENS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
SAMPLE_BY = ("document", "paragraph", "line")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide datasets' progress bars for a moment (restoring the caller's setting afterwards)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def load_text_files(files: dict[str, list[str]], *, sample_by: str, cache_dir: str | os.PathLike) -> dict[str, datasets.Dataset]:
    """``load_dataset("text")`` over local files: split -> Dataset with one ``text`` column.

    ``sample_by``: ``document`` (one row per file), ``paragraph`` (blank-line separated) or ``line``.
    """
    if sample_by not in SAMPLE_BY:
        raise DataError("data.sample_by", f"sample_by={sample_by!r}; use one of {', '.join(SAMPLE_BY)}")
    with quiet_progress():
        dd = datasets.load_dataset("text", data_files={k: [str(f) for f in v] for k, v in files.items()},
                                   sample_by=sample_by, cache_dir=str(cache_dir))
    return {split: dd[split] for split in files}


def load_hub(path: str, name: str | None, splits: dict[str, str], *, cache_dir: str | None = None) -> dict[str, datasets.Dataset]:
    """``load_dataset(path, name, split=...)`` for each of our splits (hub id or local dataset dir).

    ``splits`` maps our split name to the dataset's split expression, e.g.
    ``{"train": "train[:98%]", "validation": "train[98%:]", "test": "test"}``.

    Raises:
        DataError: offline (or no network) and not cached, not found, or a bad name/split.
    """
    ours = list(splits)
    try:
        with quiet_progress():
            parts = datasets.load_dataset(path, name, split=[splits[s] for s in ours], cache_dir=cache_dir)
    except ConnectionError as e:
        where = cache_dir or datasets.config.HF_DATASETS_CACHE
        why = "offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if datasets.config.HF_HUB_OFFLINE else "the hub is unreachable"
        raise DataError("data.hub_path", f"{path!r} (name={name!r}) is not in the datasets cache {str(where)!r} and {why} "
                        f"[{one_line(e)}]; run once with network access to cache it, point HF_HOME (or data.hub_cache_dir) "
                        "at a cache that has it, or use data=text_files with local files") from None
    except FileNotFoundError as e:  # includes datasets' DatasetNotFoundError
        raise DataError("data.hub_path", f"dataset {path!r} not found ({one_line(e)}); check the hub id or local directory") from None
    except ValueError as e:
        msg = one_line(e)
        key = "data.hub_splits" if "split" in msg.lower() else "data.hub_name"
        raise DataError(key, f"could not load {path!r} name={name!r} splits={splits}: {msg}") from None
    return dict(zip(ours, parts, strict=True))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of ``parts`` (used as datasets' ``new_fingerprint``)."""
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def _tokenize_batch(batch: dict[str, list], *, tokenizer: Tokenizer, text_field: str, eos_id: int) -> dict[str, list]:
    texts = [t for t in batch[text_field] if t and not t.isspace()]  # an empty document carries nothing
    encs = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    out = []
    for enc in encs:
        ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
        ids[:-1] = enc.ids
        ids[-1] = eos_id
        out.append(ids)
    return {"input_ids": out}


def tokenize(ds: datasets.Dataset, tokenizer: Tokenizer, *, text_field: str, eos_id: int, tokenizer_fp: str) -> datasets.Dataset:
    """One row per non-empty document: its token ids followed by EOS (int32), cached by datasets."""
    if text_field not in ds.column_names:
        raise DataError("data.text_field", f"text_field={text_field!r} is not a column of the dataset; columns: {ds.column_names}")
    with quiet_progress():
        return ds.map(
            _tokenize_batch, batched=True, remove_columns=ds.column_names, features=_TOKENS,
            fn_kwargs={"tokenizer": tokenizer, "text_field": text_field, "eos_id": eos_id},
            # the function closes over the tokenizer; name the result by what determines it instead
            new_fingerprint=fingerprint(ds._fingerprint, tokenizer_fp, text_field, eos_id, "tokenize-v1"),
            desc="tokenize",
        )


def token_column(ds: datasets.Dataset) -> pa.ChunkedArray:
    """The ``input_ids`` column as Arrow (memory-mapped, no copy)."""
    return ds.with_format("arrow")[:]["input_ids"]


def num_tokens(tokenized: datasets.Dataset) -> int:
    """Total tokens of a tokenized split (EOS included), from the Arrow list offsets."""
    if len(tokenized) == 0:
        return 0
    return int(pc.sum(pc.list_value_length(token_column(tokenized))).as_py())


def flat_tokens(column: pa.ChunkedArray | pa.Array, max_tokens: int | None = None) -> np.ndarray:
    """Concatenate a list<int> column into one int32 stream, cut to ``max_tokens``."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts, total = [], 0
    for chunk in chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        if max_tokens is not None and total + len(values) > max_tokens:
            parts.append(values[: max_tokens - total])
            break
        parts.append(values)
        total += len(values)
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, np.int32)


def pack_tokens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """(num_blocks, seq_len+1) blocks with ``block[i] = tokens[i*seq_len : i*seq_len + seq_len + 1]``.

    ``num_blocks = (len(tokens) - 1) // seq_len``: the inputs are ``block[:, :-1]`` and the targets
    ``block[:, 1:]``, so every token but the first is a target exactly once.
    """
    n = max(len(tokens) - 1, 0) // seq_len
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=tokens.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(tokens[: n * seq_len + 1], seq_len + 1)
    return windows[::seq_len]  # a view; datasets copies it into the Arrow file


def _pack_table(table: pa.Table, *, seq_len: int, max_tokens: int | None) -> dict[str, np.ndarray]:
    return {"input_ids": pack_tokens(flat_tokens(table.column("input_ids"), max_tokens), seq_len)}


def pack(tokenized: datasets.Dataset, *, seq_len: int, max_tokens: int | None = None) -> datasets.Dataset:
    """Pack a tokenized split into fixed blocks of ``seq_len+1`` tokens (cached by datasets).

    The whole split goes through one map batch because block boundaries are global; the batch is
    an Arrow table, so only the int32 stream and the blocks are materialised (~8 bytes a token).
    """
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len + 1)})
    with quiet_progress():
        return tokenized.with_format("arrow").map(
            _pack_table, batched=True, batch_size=None, remove_columns=tokenized.column_names, features=features,
            fn_kwargs={"seq_len": seq_len, "max_tokens": max_tokens},
            new_fingerprint=fingerprint(tokenized._fingerprint, seq_len, max_tokens, "pack-v1"),
            desc="pack",
        ).with_format(None)


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as int64 tensors of shape (seq_len+1,); a batch is fetched in one Arrow take."""

    def __init__(self, blocks: datasets.Dataset):
        self.blocks = blocks.with_format("numpy")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.blocks[int(i)]["input_ids"], dtype=np.int64))

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        # DataLoader calls this with a whole batch of indices: one gather instead of B lookups
        return torch.from_numpy(np.asarray(self.blocks[list(indices)]["input_ids"], dtype=np.int64))


def collate_blocks(batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Blocks -> one (B, seq_len+1) int64 tensor (batched fetching already returns one)."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


class UnigramBaseline:
    """An add-one smoothed unigram model of the train tokens: ``p(t) = (c_t + 1) / (N + V)``."""

    def __init__(self, train_counts: np.ndarray):
        counts = np.asarray(train_counts, dtype=np.float64)
        self.logp = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))  # (V,)

    def nll(self, blocks: np.ndarray) -> float:
        """Summed NLL (nats) of the targets of ``blocks`` (n, T+1): columns 1..T."""
        return float(-self.logp[np.asarray(blocks)[:, 1:]].sum())


BIGRAM_DISCOUNT = 0.75  # absolute discount of the bigram baseline (the usual Kneser-Ney value; not tuned)


class BigramBaseline:
    """An interpolated absolute-discounting bigram model fitted on the consecutive pairs of a train stream.

    ``p(w|v) = max(c(v,w) - d, 0) / c(v) + d * n1(v) / c(v) * p_uni(w)`` with ``n1(v)`` the number of
    distinct successors of ``v`` and ``p_uni`` the add-one unigram; a context never seen in training
    falls back to ``p_uni``. A trained LM that does not beat it has learned little beyond
    adjacent-token statistics.
    """

    def __init__(self, train_stream: np.ndarray, vocab_size: int, discount: float = BIGRAM_DISCOUNT):
        V = self.V = int(vocab_size)
        stream = np.asarray(train_stream, dtype=np.int64)
        prev, nxt = stream[:-1], stream[1:]
        self.keys, self.pair_counts = np.unique(prev * V + nxt, return_counts=True)  # sorted distinct pairs
        self.context_counts = np.bincount(prev, minlength=V).astype(np.float64)
        self.successors = np.bincount(self.keys // V, minlength=V).astype(np.float64)
        self.unigram = (np.bincount(stream, minlength=V) + 1.0) / (len(stream) + V)
        self.discount = discount

    def prob(self, pairs: np.ndarray) -> np.ndarray:
        """p(next | previous) of (n, 2) pairs of (previous, next) token ids."""
        v, w = np.asarray(pairs, dtype=np.int64).T
        query = v * self.V + w
        at = np.clip(np.searchsorted(self.keys, query), 0, len(self.keys) - 1)
        c_vw = np.where(self.keys[at] == query, self.pair_counts[at], 0).astype(np.float64)
        c_v = self.context_counts[v]
        seen = c_v > 0
        safe = np.where(seen, c_v, 1.0)
        d = self.discount
        return np.where(seen, np.maximum(c_vw - d, 0.0) / safe + d * self.successors[v] / safe * self.unigram[w], self.unigram[w])

    def nll(self, blocks: np.ndarray) -> float:
        """Summed NLL (nats) of every (input, target) pair of ``blocks`` (n, T+1)."""
        blocks = np.asarray(blocks)
        pairs = np.stack([blocks[:, :-1].reshape(-1), blocks[:, 1:].reshape(-1)], axis=1)
        return float(-np.log(self.prob(pairs)).sum())


def unigram_perplexity(train_counts: np.ndarray, eval_tokens: np.ndarray) -> float:
    """Perplexity of :class:`UnigramBaseline` on ``eval_tokens``: ``exp(-mean log p(t))``."""
    return float(np.exp(-UnigramBaseline(train_counts).logp[np.asarray(eval_tokens)].mean()))


def bigram_perplexity(train_stream: np.ndarray, eval_pairs: np.ndarray, vocab_size: int,
                      discount: float = BIGRAM_DISCOUNT) -> float:
    """Perplexity of :class:`BigramBaseline` on ``eval_pairs`` ((n, 2) of (previous, next) token ids)."""
    return float(np.exp(-np.log(BigramBaseline(train_stream, vocab_size, discount).prob(eval_pairs)).mean()))
