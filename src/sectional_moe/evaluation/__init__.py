"""Evaluating a trained checkpoint: test perplexity, prefill/decode throughput, text samples.

* :mod:`~sectional_moe.evaluation.evaluate` — ``python evaluate.py``: load, perplexity, ``eval.json``;
* :mod:`~sectional_moe.evaluation.generate` — KV-cached sampling and inference throughput.

May import :mod:`sectional_moe.models`, :mod:`sectional_moe.data`, :mod:`sectional_moe.runs` and
the top-level modules; not the training package.
"""
