"""Training-token counts of the data configs the planner can choose, each with how it was obtained.

A compute-optimal plan must not train for thousands of epochs on a small corpus: the planner picks
the smallest known corpus that holds the planned tokens within ``max_epochs`` passes, or refuses.
Counts are in each source's own units; our byte-level BPE with 8192 tokens splits text into more
tokens than words or GPT-2 tokens, so checking a plan against a published word count is
conservative [I].

Owns: :class:`Corpus`, :data:`CORPORA`, :func:`corpus_tokens`.
Imports: nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Corpus:
    """A data config (``conf/data/<name>.yaml``) and its training-token count."""

    name: str  # the Hydra option: data=<name>
    train_tokens: float
    provenance: str  # [P] read in its source / [D] counted here / [S] stated elsewhere / [I] recalled, not re-read
    how: str  # how the number was obtained
    note: str = ""


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        "shakespeare", 1.3e6, "[S]",
        "the comment of conf/data/shakespeare.yaml (~1.3M train tokens at vocab 8192, counted by this project's BPE "
        "when the config was written); not re-measured by the planner",
        "the embedded corpus: 34 plays for training"),
    "wikitext103": Corpus(
        "wikitext103", 103e6, "[I]",
        "published figure of Merity et al. 2016 (arXiv 1609.07843): ~103M training tokens (words; 103,227,021 as recalled, "
        "not re-read here), not measured here; conf/data/wikitext103.yaml estimates ~120M tokens of our 8192-vocab BPE [S]",
        "needs the Hugging Face hub once"),
}
"""Corpora whose size is known. ``data=hub`` and ``data=text_files`` are any corpus: their size must
be given (``--data-tokens``)."""

OPEN_ENDED = ("hub", "text_files")


def corpus_tokens(name: str, tokens: float | None = None) -> tuple[float | None, str]:
    """(training tokens, how it is known) of data config ``name``; ``tokens`` (the caller's count)
    overrides the registry. None for an open-ended config without a given count."""
    if tokens is not None:
        if tokens <= 0:
            raise ValueError(f"--data-tokens {tokens:g} must be > 0")
        return float(tokens), "given by the caller (--data-tokens)"
    if name in CORPORA:
        c = CORPORA[name]
        return c.train_tokens, f"{c.provenance} {c.how}"
    if name in OPEN_ENDED:
        return None, f"data={name} is any corpus: its size is unknown until given (--data-tokens N)"
    raise ValueError(f"--data {name!r}: use one of {sorted(CORPORA) + list(OPEN_ENDED)} (conf/data/*.yaml)")
