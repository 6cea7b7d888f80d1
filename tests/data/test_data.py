"""Data: corpus splits, tokenizer cache, packing, loading paths, DataErrors, baseline, exact resume.

Offline by construction (conftest sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); the Shakespeare
tokenizer (vocab 512) and datasets caches live in the session cache shared with the other tests.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import datasets
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from sectional_moe.data import (
    EOS_TOKEN, LMDataModule, ResumableDataLoader, ShardedSampler, clean_play, pack_tokens, split_plays,
    unigram_perplexity, write_shakespeare,
)
from sectional_moe.data import tokenizer as tokenizer_mod
from sectional_moe.data.corpus import play_files
from sectional_moe.data.loading import BlockDataset, collate_blocks
from sectional_moe.errors import DataError

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"
PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
         "must be in want of a wife.\nHowever little known the feelings or views of such a man may be "
         "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
         "surrounding families, that he is considered the rightful property of some one or other of "
         "their daughters.\n")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The session cache of conftest (shared with the training tests), else a temporary one."""
    return Path(os.environ.get("SECTIONAL_MOE_CACHE") or tmp_path_factory.mktemp("smoe-cache"))


@pytest.fixture(scope="module")
def shakespeare(cache_dir: Path) -> LMDataModule:
    dm = LMDataModule(seq_len=64, vocab_size=512, batch_size=8, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def write_text_corpus(root: Path, *, train_docs: int = 6, repeat: int = 4) -> dict[str, list[str]]:
    """A few small prose files per split under ``root``."""
    files: dict[str, list[str]] = {}
    for split, n in (("train", train_docs), ("val", 2), ("test", 2)):
        files[split] = []
        for i in range(n):
            p = root / split / f"doc{i}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"Document {split} {i}.\n\n" + PROSE * repeat + f"\nThe end of {split} {i}.\n")
            files[split].append(str(p))
    return files


def text_dm(root: Path, files: dict[str, list[str]], **kw) -> LMDataModule:
    args = dict(source="text_files", train_files=files["train"], val_files=files["val"], test_files=files["test"],
                vocab_size=300, seq_len=16, batch_size=2, cache_dir=root / "cache")
    args.update(kw)
    return LMDataModule(**args)


def assert_one_line_data_error(excinfo: pytest.ExceptionInfo, key: str, *fragments: str) -> None:
    err = excinfo.value
    assert isinstance(err, DataError) and err.key == key, (err.key, str(err))
    assert "\n" not in str(err)
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))


# ----------------------------------------------------------------------------------- corpus
def test_shakespeare_splits_are_disjoint_by_play_with_held_out_plays(cache_dir: Path):
    splits = split_plays(["twelfth-night", "macbeth"], ["julius-caesar", "the-tempest"])
    assert splits["validation"] == ["twelfth-night", "macbeth"]
    assert splits["test"] == ["julius-caesar", "the-tempest"]
    assert len(splits["train"]) == 34
    names = [p for s in splits.values() for p in s]
    assert len(names) == len(set(names)) == len(play_files()) == 38

    files = write_shakespeare(cache_dir, splits["validation"], splits["test"])
    for split, paths in files.items():
        assert [p.stem for p in paths] == splits[split]
        assert all(p.parent.name == split and p.stat().st_size > 10_000 for p in paths)
    macbeth = files["validation"][1].read_text()
    assert macbeth.startswith("Macbeth\n") and "Double, double toil and trouble" in macbeth
    assert not any(m in macbeth for m in ("**", "_", "#", "\\["))


def test_clean_play_removes_markdown_but_keeps_the_words():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
          "**BERNARDO**  \nWho's there?  \n_\\[Aside]_  \n\\--Nay, answer me.\n")
    assert clean_play(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO and\nFRANCISCO\n\n"
                              "BERNARDO\nWho's there?\n[Aside]\n--Nay, answer me.\n")


@pytest.mark.parametrize("val, test, key, fragment", [
    (["macbeth", "no-such-play"], ["the-tempest"], "data.val_plays", "no-such-play"),
    (["macbeth"], ["macbeth"], "data.test_plays", "one split only"),
    ([], ["the-tempest"], "data.val_plays", "at least one"),
])
def test_split_plays_rejects_bad_play_lists(val, test, key, fragment):
    with pytest.raises(DataError) as e:
        split_plays(val, test)
    assert_one_line_data_error(e, key, fragment)


# ----------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_text_and_has_eos(shakespeare: LMDataModule):
    tok = shakespeare.tokenizer
    text = Path(shakespeare._text_files()["validation"][0]).read_text()[:20_000] + "naïve café — “quoted” 日本\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert shakespeare.vocab_size == tok.get_vocab_size() == 512
    assert tok.id_to_token(shakespeare.eos_id) == EOS_TOKEN


def test_tokenizer_is_cached_by_corpus_and_not_retrained(tmp_path: Path, monkeypatch):
    files = write_text_corpus(tmp_path)
    first = text_dm(tmp_path, files)
    first.prepare_data()
    path = first.tokenizer_file
    assert path.parent == tmp_path / "cache" / "tokenizers" and path.name.endswith("-bpe300.json")
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer was retrained")

    monkeypatch.setattr(tokenizer_mod, "train_bpe", no_training)
    monkeypatch.setattr("sectional_moe.data.datamodule.train_bpe", no_training)
    second = text_dm(tmp_path, files)
    second.prepare_data()
    assert second.tokenizer_file == path and path.stat().st_mtime_ns == mtime
    assert second.tokenizer.to_str() == first.tokenizer.to_str()

    # other train text -> another fingerprint -> a new tokenizer (training is allowed again)
    monkeypatch.undo()
    Path(files["train"][0]).write_text("Something else entirely, and more of it.\n" * 50)
    third = text_dm(tmp_path, files)
    assert third.tokenizer_file != path


def test_given_tokenizer_file_is_used_as_is(tmp_path: Path):
    files = write_text_corpus(tmp_path)
    trained = text_dm(tmp_path, files)
    saved = tmp_path / "my-tokenizer.json"
    trained.tokenizer.save(str(saved))
    dm = text_dm(tmp_path, files, tokenizer_path=str(saved), vocab_size=trained.vocab_size, cache_dir=tmp_path / "other")
    dm.prepare_data()
    assert dm.tokenizer_file == saved and dm.vocab_size == trained.vocab_size
    assert not (tmp_path / "other" / "tokenizers").exists()


# ----------------------------------------------------------------------------------- packing
def test_pack_tokens_makes_every_token_a_target_once_and_no_block_crosses_the_end():
    tokens = np.arange(103, dtype=np.int32)
    blocks = pack_tokens(tokens, seq_len=10)
    assert blocks.shape == (10, 11)
    assert (blocks[1:, 0] == blocks[:-1, -1]).all()  # consecutive blocks share exactly one token
    np.testing.assert_array_equal(blocks[:, 1:].reshape(-1), np.arange(1, 101))  # targets: each once
    assert blocks.max() <= 102
    assert pack_tokens(tokens[:10], seq_len=10).shape == (0, 11)  # shorter than one block
    assert pack_tokens(tokens[:11], seq_len=10).shape == (1, 11)


def test_datamodule_serves_packed_int64_blocks(shakespeare: LMDataModule):
    L = shakespeare.seq_len
    batch = next(iter(shakespeare.train_dataloader()))
    assert batch.shape == (8, L + 1) and batch.dtype == torch.int64
    assert int(batch.max()) < shakespeare.vocab_size
    for split in ("train", "validation", "test"):
        assert shakespeare.num_blocks(split) == (shakespeare.num_tokens(split) - 1) // L
    val = torch.cat(list(shakespeare.val_dataloader()))
    assert len(val) == shakespeare.num_blocks("validation")  # in order, nothing dropped on one rank
    assert torch.equal(val[1:, 0], val[:-1, -1])
    # the validation stream is exactly the tokenized plays, each followed by EOS
    stream = []
    for f in shakespeare._text_files()["validation"]:
        stream += shakespeare.tokenizer.encode(Path(f).read_text()).ids + [shakespeare.eos_id]
    n = len(val) * L + 1
    np.testing.assert_array_equal(torch.cat([val[:, :-1].reshape(-1), val[-1, -1:]]).numpy(), np.array(stream[:n]))


def test_describe_reports_source_vocab_tokens_and_blocks(shakespeare: LMDataModule):
    d = shakespeare.describe()
    assert d["source"] == "shakespeare" and d["vocab_size"] == 512 and d["seq_len"] == 64
    assert d["tokens_train"] > 1_000_000 and 30_000 < d["tokens_validation"] < 300_000
    assert d["blocks_validation"] == (d["tokens_validation"] - 1) // 64
    json.dumps(d)  # plain values, loggable as run config


def test_unigram_baseline_is_finite_and_sensible(shakespeare: LMDataModule):
    ppl = shakespeare.unigram_ppl("validation")
    assert np.isfinite(ppl) and 50 < ppl < 5000
    assert shakespeare.unigram_ppl("val") == ppl
    assert ppl < shakespeare.vocab_size  # better than a uniform guess over the vocabulary
    counts = np.array([3, 1, 0])
    assert unigram_perplexity(counts, np.array([0])) == pytest.approx(7 / 4)


def test_bigram_baseline_matches_hand_counts_and_beats_the_unigram(shakespeare: LMDataModule):
    from sectional_moe.data.loading import bigram_perplexity

    # stream 0 1 0 1 0 2 (V = 3): c(0) = 3 with successors {1: 2, 2: 1}; p_uni = (3, 2, 1) / 9 smoothed
    stream = np.array([0, 1, 0, 1, 0, 2])
    uni = (np.array([3, 2, 1]) + 1.0) / (6 + 3)
    p_01 = (2 - 0.75) / 3 + 0.75 * 2 / 3 * uni[1]
    p_20 = uni[0]  # context 2 never precedes anything in training: the unigram fallback
    expected = np.exp(-np.mean(np.log([p_01, p_20])))
    assert bigram_perplexity(stream, np.array([[0, 1], [2, 0]]), 3) == pytest.approx(expected, rel=1e-12)
    # it is a distribution over the next token for every context
    for ctx in range(3):
        probs = [1 / bigram_perplexity(stream, np.array([[ctx, w]]), 3) for w in range(3)]
        assert sum(probs) == pytest.approx(1.0, rel=1e-12)
    assert 5 < shakespeare.bigram_ppl("validation") < shakespeare.unigram_ppl("validation")


# ----------------------------------------------------------------------------------- loading
def test_text_files_are_loaded_by_the_datasets_text_builder(tmp_path: Path, monkeypatch):
    files = write_text_corpus(tmp_path)
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs.get("sample_by"), kwargs.get("cache_dir")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    per_doc = text_dm(tmp_path, files)
    per_doc.prepare_data()
    assert calls == [("text", "document", str(tmp_path / "cache" / "datasets"))]
    per_para = text_dm(tmp_path, files, sample_by="paragraph")
    per_para.prepare_data()
    assert calls[-1][:2] == ("text", "paragraph")
    # one EOS per document: a paragraph per row gives more documents, so more tokens
    eos = per_doc.eos_id
    n_docs = sum(int((np.asarray(r) == eos).sum()) for r in per_doc._split("train").tokens["input_ids"])
    n_paras = sum(int((np.asarray(r) == eos).sum()) for r in per_para._split("train").tokens["input_ids"])
    assert n_docs == 6 and n_paras > n_docs
    assert list(Path(tmp_path / "cache" / "datasets").rglob("text-train.arrow"))


def test_text_files_accept_globs_and_default_test_to_validation(tmp_path: Path):
    files = write_text_corpus(tmp_path)
    dm = text_dm(tmp_path, {"train": [str(tmp_path / "train" / "*.txt")], "val": files["val"], "test": None})
    dm.prepare_data()
    assert len(dm._text_files()["train"]) == 6
    assert dm.num_tokens("test") == dm.num_tokens("validation")


def test_hub_source_reads_any_dataset_with_its_text_field(tmp_path: Path):
    root = tmp_path / "local_hub_dataset"
    root.mkdir()
    for split, n in (("train", 8), ("validation", 2), ("test", 2)):
        rows = [{"content": f"{split} row {i}. " + PROSE * 2, "id": i} for i in range(n)] + [{"content": "  ", "id": -1}]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = LMDataModule(source="hub", hub_path=str(root), text_field="content", vocab_size=300, seq_len=16,
                      batch_size=2, cache_dir=tmp_path / "cache", hub_cache_dir=str(tmp_path / "hf"))
    dm.prepare_data()
    assert dm.name == str(root)
    assert len(dm._split("train").tokens) == 8  # the blank row is dropped
    assert next(iter(dm.train_dataloader())).shape == (2, 17)

    bad = LMDataModule(source="hub", hub_path=str(root), text_field="body", vocab_size=300, seq_len=16,
                       cache_dir=tmp_path / "cache", hub_cache_dir=str(tmp_path / "hf"))
    with pytest.raises(DataError) as e:
        bad.prepare_data()
    assert_one_line_data_error(e, "data.text_field", "'body'", "content")


def test_hub_dataset_offline_and_not_cached_fails_with_one_clear_line(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DATA / "wikitext103.yaml"))
    dm = LMDataModule(**(cfg | {"hub_cache_dir": str(tmp_path / "hf")}), seq_len=16, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    assert_one_line_data_error(e, "data.hub_path", "'wikitext'", "wikitext-103-raw-v1", "offline",
                               "run once with network access", "HF_HOME", "data=text_files")
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 100_000  # nothing downloaded


# ----------------------------------------------------------------------------------- errors
def _error_cases(tmp_path: Path) -> dict[str, tuple[dict, str, tuple[str, ...]]]:
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n  \n")
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    return {
        "missing train file": (dict(train_files=[str(tmp_path / "nope.txt")]), "data.train_files", ("nope.txt", "does not exist")),
        "glob matching nothing": (dict(val_files=str(tmp_path / "*.md")), "data.val_files", ("matches no file",)),
        "text_files without train files": (dict(train_files=None), "data.train_files", ("required",)),
        "empty train corpus": (dict(train_files=[str(blank)]), "data.train_files", ("empty",)),
        "empty validation split": (dict(val_files=[str(blank)]), "data.val_files", ("validation split is empty",)),
        "validation shorter than a block": (dict(val_files=[str(short)], seq_len=32), "data.val_files",
                                            ("validation split has", "fewer than the seq_len+1=33", "smaller size.seq_len")),
        "eval cap shorter than a block": (dict(max_eval_tokens=10), "data.max_eval_tokens", ("10 tokens", "seq_len+1=17")),
        "fewer blocks than a batch": (dict(batch_size=10_000), "data.batch_size", ("batch_size=10000",)),
        "unknown source": (dict(source="parquet"), "data.source", ("shakespeare", "text_files", "hub")),
        "vocab too small": (dict(vocab_size=200), "data.vocab_size", ("257",)),
        "unknown option": (dict(batchsize=4), "data.batchsize", ("known:",)),
        "bad sample_by": (dict(sample_by="sentence"), "data.sample_by", ("paragraph",)),
        "hub without path": (dict(source="hub"), "data.hub_path", ("required",)),
        "missing tokenizer file": (dict(tokenizer_path=str(tmp_path / "tok.json")), "data.tokenizer_path", ("does not exist",)),
    }


@pytest.mark.parametrize("case", [
    "missing train file", "glob matching nothing", "text_files without train files", "empty train corpus",
    "empty validation split", "validation shorter than a block", "eval cap shorter than a block",
    "fewer blocks than a batch", "unknown source", "vocab too small", "unknown option", "bad sample_by",
    "hub without path", "missing tokenizer file",
])
def test_bad_data_config_raises_data_error_before_training(case: str, tmp_path: Path):
    kwargs, key, fragments = _error_cases(tmp_path)[case]
    files = write_text_corpus(tmp_path)
    with pytest.raises(DataError) as e:
        dm = text_dm(tmp_path, files, **kwargs)
        dm.prepare_data()
    assert_one_line_data_error(e, key, *fragments)


def test_tokenizer_file_with_another_vocab_size_is_rejected(tmp_path: Path):
    files = write_text_corpus(tmp_path)
    trained = text_dm(tmp_path, files)
    saved = tmp_path / "tok.json"
    trained.tokenizer.save(str(saved))
    with pytest.raises(DataError) as e:
        text_dm(tmp_path, files, tokenizer_path=str(saved), vocab_size=8192).prepare_data()
    n = trained.vocab_size
    assert_one_line_data_error(e, "data.vocab_size", f"has {n} tokens", f"set data.vocab_size={n}")


def test_shakespeare_rejects_unknown_held_out_play(cache_dir: Path):
    with pytest.raises(DataError) as e:
        LMDataModule(seq_len=16, vocab_size=512, val_plays=["hamlet", "cardenio"], cache_dir=cache_dir).prepare_data()
    assert_one_line_data_error(e, "data.val_plays", "cardenio")


# ----------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["shakespeare", "text_files", "wikitext103", "hub"])
def test_every_data_config_is_accepted_by_the_datamodule(name: str, tmp_path: Path):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DATA / f"{name}.yaml"))
    assert isinstance(cfg, dict) and "_target_" not in cfg
    assert {"source", "name", "vocab_size", "batch_size", "max_train_tokens", "max_eval_tokens"} <= set(cfg)
    if name in ("text_files", "hub"):  # paths are required and deliberately left empty
        with pytest.raises(DataError) as e:
            LMDataModule(**cfg, seq_len=16, cache_dir=tmp_path, seed=0)
        assert e.value.key in ("data.train_files", "data.hub_path")
    else:
        dm = LMDataModule(**cfg, seq_len=16, cache_dir=tmp_path, seed=0)
        assert dm.batch_size == cfg["batch_size"] > 0 and dm.vocab_size_requested == 8192
        assert dm.pin_memory == torch.cuda.is_available()


# ----------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sharded_sampler_gives_disjoint_equal_shards(world: int, shuffle: bool):
    n = 103
    shards = [list(ShardedSampler(n, shuffle=shuffle, seed=5, rank=r, world_size=world)) for r in range(world)]
    sizes = {len(s) for s in shards}
    assert sizes == {n // world}
    union = [i for s in shards for i in s]
    assert len(union) == len(set(union)) == n // world * world and set(union) <= set(range(n))
    if not shuffle:
        assert shards[0] == sorted(shards[0])


def test_shuffle_order_depends_only_on_seed_and_epoch():
    a, b, c = (ShardedSampler(50, shuffle=True, seed=s) for s in (1, 1, 2))
    assert list(a) == list(b) != list(c)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    a.set_epoch(0)
    assert list(a) == first


def _blocks_loader(n: int = 20, batch_size: int = 3, seed: int = 0, **kw) -> ResumableDataLoader:
    blocks = datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(n)]})
    return ResumableDataLoader(BlockDataset(blocks), batch_size=batch_size, drop_last=True, collate_fn=collate_blocks,
                               sampler=ShardedSampler(n, shuffle=True, seed=seed, **kw))


def test_loader_state_dict_continues_mid_epoch_and_rolls_over_epochs():
    def firsts(loader, k):
        it = iter(loader)
        return [int(next(it)[0, 0]) for _ in range(k)]

    reference = firsts(_blocks_loader(), 6)[:6]  # 6 batches per epoch (20 // 3)
    loader = _blocks_loader()
    head = firsts(loader, 4)
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["start"] == 12
    resumed = _blocks_loader()
    resumed.load_state_dict(state)
    assert head + firsts(resumed, 2) == reference
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["start"] == 0  # last batch -> next epoch
    epoch1 = firsts(resumed, 6)
    fresh = _blocks_loader()
    fresh.sampler.set_epoch(1)
    assert epoch1 == firsts(fresh, 6) != reference


class _RecordBatches(pl.LightningModule):
    """Records the first tokens of every training batch (enough to identify its blocks)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch[:, :4].flatten().tolist()))
        return (self.w * batch.float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", batch.float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(cache_dir: Path, ckpt_dir: Path, max_steps: int, ckpt_path: str | None = None, num_workers: int = 0) -> list:
    # 40 blocks of 17 tokens, batch 4 -> 10 batches per epoch
    dm = LMDataModule(seq_len=16, vocab_size=512, batch_size=4, max_train_tokens=16 * 40 + 1, max_eval_tokens=16 * 4 + 1,
                      cache_dir=cache_dir, seed=3, num_workers=num_workers)
    module = _RecordBatches()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=4, check_val_every_n_epoch=None,
        limit_val_batches=1, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.fixture(scope="module")
def uninterrupted(cache_dir: Path, tmp_path_factory) -> list:
    seen = _fit(cache_dir, tmp_path_factory.mktemp("full"), max_steps=25)
    assert len(seen) == 25 and len(set(seen)) == 25
    assert seen[:10] != seen[10:20]  # a new order each epoch
    return seen


@pytest.mark.parametrize("stop, num_workers", [
    (7, 0),   # middle of epoch 0
    (10, 0),  # exactly at the end of epoch 0
    (13, 0),  # middle of epoch 1, after crossing a boundary
    (7, 1),   # with a worker process prefetching ahead
])
def test_train_loader_resumes_exactly_with_a_real_trainer(stop: int, num_workers: int, uninterrupted: list,
                                                          cache_dir: Path, tmp_path: Path):
    first = _fit(cache_dir, tmp_path / "a", max_steps=stop, num_workers=num_workers)
    assert (tmp_path / "a" / "last.ckpt").is_file()
    rest = _fit(cache_dir, tmp_path / "b", max_steps=25, ckpt_path=str(tmp_path / "a" / "last.ckpt"), num_workers=num_workers)
    assert len(first) == stop and len(rest) == 25 - stop
    assert first + rest == uninterrupted


def test_overfit_batches_repeats_the_same_batches(cache_dir: Path):
    dm = LMDataModule(seq_len=16, vocab_size=512, batch_size=4, max_train_tokens=16 * 40 + 1, max_eval_tokens=16 * 4 + 1,
                      cache_dir=cache_dir)
    module = _RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, max_epochs=-1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, overfit_batches=2,
                         num_sanity_val_steps=0, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    assert module.seen[:2] == module.seen[2:4] == module.seen[4:6]
