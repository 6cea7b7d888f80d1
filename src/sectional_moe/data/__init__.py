"""Data: the embedded Shakespeare corpus, local text files or HF hub datasets, a cached byte-level
BPE, packed fixed-length blocks, and a LightningDataModule whose train loader resumes exactly.

``LMDataModule(**cfg.data, seq_len=..., cache_dir=..., seed=...)`` is the entry point; local text
files are checked (binary content, encoding) by :mod:`~sectional_moe.data.textfiles` first.
"""

from sectional_moe.data.corpus import clean_play, split_plays, write_shakespeare
from sectional_moe.data.datamodule import LMDataModule
from sectional_moe.data.loading import pack_tokens, unigram_perplexity
from sectional_moe.data.sampler import ResumableDataLoader, ShardedSampler
from sectional_moe.data.tokenizer import EOS_TOKEN

__all__ = [
    "EOS_TOKEN",
    "LMDataModule",
    "ResumableDataLoader",
    "ShardedSampler",
    "clean_play",
    "pack_tokens",
    "split_plays",
    "unigram_perplexity",
    "write_shakespeare",
]
