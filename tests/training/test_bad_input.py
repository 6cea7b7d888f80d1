"""The bad-input catalogue: each kind of mistake gives ONE line naming the key and the fix, before any
compute starts, and a non-zero exit.

Most cases run in-process through :func:`sectional_moe.train.main` (what ``python train.py`` calls
after Hydra composed the config) or :func:`sectional_moe.train.check_cli_or_exit` (what it calls
before Hydra, for unknown group options). The model class and the Trainer are replaced by tripwires,
so a case that reached model building would fail. Three cases run the real ``python train.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sectional_moe.training import run as train_mod
from sectional_moe.runs.checkpoints import atomic_save
from sectional_moe.cluster.sweeps import check_launcher
from sectional_moe.training.overrides import check_cli_overrides_or_exit
from sectional_moe.training.validate import validate_config
from sectional_moe.errors import ConfigError
from tests.conftest import CONF, run_train_cli


@pytest.fixture
def no_compute(monkeypatch):
    """Tripwires: building the model or a Trainer means a check came too late."""

    def tripwire(*args, **kwargs):
        raise AssertionError("compute started before the bad input was reported")

    monkeypatch.setattr(train_mod, "LMModule", tripwire)
    monkeypatch.setattr(train_mod.pl, "Trainer", tripwire)


def expect_one_line(capsys, call, code: int = 2) -> str:
    """Run ``call``; assert it exits ``code`` with exactly one ``error:`` line and no traceback."""
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def run_main(cfg) -> None:
    train_mod.main(cfg)
    raise AssertionError("main() returned on bad input")


# (id, overrides, key named in the line, a fragment of the fix)
CONFIG_CASES = [
    ("unknown-family-key", ["model.family=mixture"], "model", "use model=dense, model=moe or model=sectional"),
    ("routing-invalid-for-family", ["model=moe", "routing=segment_fixed"], "routing", "use routing=topk or routing=hash"),
    ("experts-zero", ["experts=0"], "experts", "must be a positive integer, e.g. experts=8"),
    ("experts-not-dividing-d_model", ["experts=3"], "experts", "pick experts dividing d_model"),
    ("heads-not-dividing-d_model", ["size.n_heads=3"], "size.n_heads", "pick n_heads dividing d_model"),
    ("kv-heads-not-dividing-heads", ["size.n_kv_heads=3"], "size.n_kv_heads", "pick n_kv_heads dividing n_heads"),
    ("top_k-above-experts", ["routing=topk", "routing.top_k=5", "experts=4"], "routing.top_k", "use routing.top_k<=4 or more experts"),
    ("seq_reduction-not-dividing-seq_len", ["model.seq_reduction=3"], "model.seq_reduction", "pick r dividing seq_len"),
    ("batch-size-zero", ["data.batch_size=0"], "data.batch_size", "must be a whole number > 0"),
    ("lr-zero", ["optim.lr=0"], "optim.lr", "must be a number > 0"),
    ("lr-negative", ["optim.lr=-3e-4"], "optim.lr", "must be a number > 0"),
    ("max-steps-zero", ["trainer.max_steps=0"], "trainer.max_steps", "> 0"),
    ("warmup-longer-than-run", ["optim.warmup_steps=50"], "optim.warmup_steps", "shorten the warmup"),
    ("no-validation-would-run", ["trainer.val_check_interval=100"], "trainer.val_check_interval", "use val_check_interval<=12"),
    ("fp16-on-cpu", ["trainer.accelerator=cpu", "trainer.precision=16-mixed"], "trainer.precision", "use 32-true or bf16-mixed"),
    ("unknown-precision", ["trainer.precision=fp8"], "trainer.precision", "use one of auto, 32-true"),
    ("peak-tflops-negative", ["hardware.peak_tflops=-5"], "hardware.peak_tflops", "must be a number > 0"),
    ("peak-tflops-in-flops-not-tflops", ["hardware.peak_tflops=3.12e14"], "hardware.peak_tflops", "hardware.peak_tflops=312"),
    ("peak-tflops-not-a-number", ["hardware.peak_tflops=fast"], "hardware.peak_tflops", "must be a number > 0"),
    ("nan-guard-policy", ["callbacks.nan_guard.policy=ignore"], "callbacks.nan_guard.policy", "use stop"),
    ("nan-guard-max-skips", ["callbacks.nan_guard.max_skips=-1"], "callbacks.nan_guard.max_skips", ">= 0"),
    ("wandb-mode", ["logger=wandb", "logger.wandb.mode=sometimes"], "logger.wandb.mode", "use one of auto, online, offline"),
    ("resume-missing-file", ["resume=/nonexistent/last.ckpt"], "resume", "neither auto/never nor an existing checkpoint"),
    ("unknown-data-source", ["data.source=ftp"], "data.source", "use one of shakespeare, text_files, hub"),
    ("vocab-too-small", ["data.vocab_size=100"], "data.vocab_size", "use e.g. data.vocab_size=8192"),
    ("tokenizer-file-missing", ["data.tokenizer_path=/nonexistent/tok.json"], "data.tokenizer_path", "give a tokenizers JSON file"),
    ("fsdp-on-cpu-accelerator", ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true"], "trainer.strategy",
     "use trainer=ddp_sim on CPU"),
    # issue 19, fault 7: strict booleans (any non-empty string used to be true)
    ("strict-bool-compile-maybe", ["compile=maybe"], "compile", "use compile=true, compile=false or compile=auto"),
    ("strict-bool-compile-off", ["compile=off"], "compile", "compile='off' is not a boolean"),
    ("strict-bool-pre-expert-off", ["model.pre_expert=off"], "model.pre_expert", "use model.pre_expert=true or model.pre_expert=false"),
    ("strict-bool-force-1", ["force=1"], "force", "force=1 is not a boolean"),
    ("strict-bool-malloc-reuse-on", ["malloc_reuse=on"], "malloc_reuse", "use malloc_reuse=true, malloc_reuse=false or malloc_reuse=auto"),
    ("strict-bool-deterministic-yes", ["trainer.deterministic=yes"], "trainer.deterministic", "or trainer.deterministic=warn"),
    # fault 8: a model that cannot fit is refused before anything is allocated, with the estimate
    ("model-cannot-fit", ["size.d_model=16384", "size.n_layers=48"], "memory_check", "GiB per rank (parameters"),
    # fault 11
    ("seed-negative", ["seed=-1"], "seed", "must be a whole number from 0 to 4294967295"),
    ("seed-too-large", ["seed=4294967296"], "seed", "from 0 to 4294967295"),
    ("devices-zero", ["trainer.devices=0"], "trainer.devices", "devices=0 runs on no device; use trainer.devices=1"),
    ("devices-negative", ["trainer.devices=-2"], "trainer.devices", "runs on no device"),
    ("devices-empty-list", ["trainer.devices=[]"], "trainer.devices", "runs on no device"),
    # fault 12 (composed from a yaml or a study: the command line is checked before Hydra, below)
    ("task-name-traversal", ["task_name=../../X"], "task_name", "no '/', no '..'"),
    ("task-name-absolute", ["task_name=/etc"], "task_name", "must be one folder name"),
    # more hostile inputs (what a tired researcher types at 2 a.m.)
    ("seed-fractional", ["seed=1.5"], "seed", "must be a whole number"),
    ("threads-zero", ["threads=0"], "threads", "a number of CPU threads >= 1"),
    ("val-interval-above-one-not-whole", ["trainer.val_check_interval=1.5"], "trainer.val_check_interval",
     "a fraction of trainer.max_steps between 0 and 1"),
    ("limit-val-batches-zero", ["trainer.limit_val_batches=0"], "trainer.limit_val_batches", "must be auto, a number of batches >= 1"),
    ("warmup-negative-fraction", ["optim.warmup_steps=-0.1"], "optim.warmup_steps", "must be auto"),
    ("log-every-zero", ["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps", "a whole number of steps > 0"),
    ("encoding-unknown", ["data=text_files", "data.train_files=[a.txt]", "data.val_files=[a.txt]", "data.encoding=klingon"],
     "data.encoding", "use e.g. utf-8, latin-1 or cp1252"),
    ("run-lock-stale-negative", ["run_lock_stale_s=-1"], "run_lock_stale_s", "must be a number > 0"),
    ("wandb-timeout-zero", ["logger=wandb", "logger.wandb.startup_timeout_s=0"], "logger.wandb.startup_timeout_s", "must be a number > 0"),
    ("print-config-maybe", ["print_config=maybe"], "print_config", "or print_config=auto"),
]
if not torch.cuda.is_available():
    CONFIG_CASES.append(("gpu-without-cuda", ["trainer=gpu"], "trainer.accelerator", "use trainer=cpu"))
    CONFIG_CASES.append(("fsdp-without-cuda", ["trainer=fsdp"], "trainer.strategy", "use trainer=ddp_sim on CPU"))


@pytest.mark.parametrize("overrides,key,fix", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_one_line_exit_2(compose, capsys, no_compute, tmp_path, overrides, key, fix):
    cfg = compose(*overrides)
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith(f"error: {key}: "), line
    assert fix in line
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith(f"{key}: ")


@pytest.mark.parametrize("devices,shown", [(4, "devices=4"), ("[0,3]", "devices=[0, 3]"), ("'0,2'", "devices=[0, 2]")],
                         ids=["count", "index-list", "index-string"])
def test_more_devices_than_visible_gpus(compose, capsys, no_compute, tmp_path, monkeypatch, devices, shown):
    """On a node with one visible GPU (faked: this check must not need real GPUs to be tested)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose("trainer=gpu", f"trainer.devices={devices}")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith(f"error: trainer.devices: {shown} but only 1 CUDA device(s) are visible"), line
    assert "use trainer.devices<=1" in line
    assert json.loads((tmp_path / "run" / "status.json").read_text())["error"].startswith("trainer.devices: ")


def test_devices_that_exist_pass(compose, monkeypatch):
    from sectional_moe.training.validate import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for devices in (1, 2, -1, "auto", [1], "0,1"):
        check_devices({"accelerator": "gpu", "devices": devices})
    check_devices({"accelerator": "cpu", "devices": 8})  # CPU processes are not GPUs


# ------------------------------------------------------------------------ unknown group options
@pytest.mark.parametrize(
    "argv,key,fix",
    [
        (["routing=foo"], "routing", "use one of hash, none, segment_fixed, topk"),
        (["model=mixture"], "model", "use one of dense, moe, sectional"),
        (["size=huge"], "size", "use one of base, large, medium, nano, small, tiny"),
        (["-m", "experts=2,4", "routing=topk,fancy"], "routing", "routing=fancy is not an option"),
        (["logger=[csv,tensorboard]"], "logger", "logger=tensorboard is not an option"),
        (["trainer=tpu"], "trainer", "use one of cpu"),
    ],
    ids=["routing", "family", "size-preset", "sweep", "logger-list", "trainer"],
)
def test_unknown_group_option_one_line(capsys, argv, key, fix):
    line = expect_one_line(capsys, lambda: check_cli_overrides_or_exit(argv, CONF))
    assert line.startswith(f"error: {key}: ") and fix in line, line


def test_valid_command_lines_pass_the_group_check():
    from sectional_moe import resolvers

    resolvers.register()  # as train.py does before the check
    for argv in (["model=moe", "routing=hash", "size=nano"], ["-m", "experts=2,4", "routing=topk,hash"],
                 ["logger=[wandb,csv]", "experiment=quick"], ["--cfg", "job", "logger=none"],
                 ["+callbacks.x._target_=a.B", "~tags", "hydra/launcher=submitit_local"]):
        check_cli_overrides_or_exit(argv, CONF)  # no SystemExit


# ------------------------------------------------------------------------ data problems
def test_missing_data_file(compose, capsys, no_compute, tmp_path):
    cfg = compose("data=text_files", f"data.train_files=[{tmp_path}/nope.txt]", f"data.val_files=[{tmp_path}/nope.txt]")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith("error: data.train_files: ") and "does not exist" in line and "give existing text files" in line


def test_empty_corpus(compose, capsys, no_compute, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n\n")
    cfg = compose("data=text_files", f"data.train_files=[{tmp_path}/empty.txt]", f"data.val_files=[{tmp_path}/empty.txt]")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith("error: data.train_files: ") and "empty" in line and "give files with text" in line


def test_dataset_too_short_for_one_block(compose, capsys, no_compute, tmp_path):
    text = "To be, or not to be, that is the question. " * 200
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text("Words, words, words.")
    cfg = compose("data=text_files", "data.vocab_size=300", f"data.train_files=[{tmp_path}/train.txt]", f"data.val_files=[{tmp_path}/val.txt]")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith("error: data.val_files: ") and "fewer than the seq_len+1=65" in line and "smaller size.seq_len" in line


def test_train_split_smaller_than_one_batch(compose, capsys, no_compute):
    cfg = compose("data.max_train_tokens=200", "data.batch_size=8")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith("error: data.batch_size: ") and "lower data.batch_size" in line


# ------------------------------------------------------------------------ checkpoints
def _fake_checkpoint(path: Path, spec: dict) -> Path:
    atomic_save({"state_dict": {}, "global_step": 3, "hyper_parameters": {"spec": spec}}, path)
    return path


def test_vocab_mismatch_with_checkpoint(compose, capsys, no_compute, tmp_path):
    spec = validate_config(compose()).to_dict()
    ckpt = _fake_checkpoint(tmp_path / "other.ckpt", {**spec, "vocab_size": 1000})
    cfg = compose(f"resume={ckpt}")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith("error: data.vocab_size: ") and "vocab_size=1000 but the tokenizer has 512" in line and "resume=never" in line


def test_checkpoint_of_another_model(compose, capsys, no_compute, tmp_path):
    spec = validate_config(compose()).to_dict()
    ckpt = _fake_checkpoint(tmp_path / "other.ckpt", {**spec, "d_model": 128})
    cfg = compose(f"resume={ckpt}")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith("error: resume: ") and "d_model=128" in line and "d_model=64" in line


def test_truncated_checkpoint_given_as_resume(compose, capsys, no_compute, tmp_path):
    spec = validate_config(compose()).to_dict()
    ckpt = _fake_checkpoint(tmp_path / "cut.ckpt", spec)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    cfg = compose(f"resume={ckpt}")
    line = expect_one_line(capsys, lambda: run_main(cfg))
    assert line.startswith("error: resume: ") and "not a readable checkpoint" in line and "resume=never" in line


# ------------------------------------------------------------------------ launcher
def test_slurm_launcher_without_slurm(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch anywhere
    with pytest.raises(ConfigError) as err:
        check_launcher({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"})
    assert err.value.key == "hydra/launcher" and "sbatch" in str(err.value) and "run on a SLURM login node" in str(err.value)
    check_launcher({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})  # local: fine


# ------------------------------------------------------------------------ the real command line
ESCAPE = "escaped_by_task_name"
CLI_CASES = [
    ("hydra-group-typo", ["routing=foo"], "routing", "use one of hash, none, segment_fixed, topk"),
    ("config-error", ["size=nano", "experts=3", "logger=none"], "experts", "pick experts dividing d_model"),
    ("slurm-launcher", ["-m", "hydra/launcher=submitit_slurm", "experts=2,4", "logger=none"], "hydra/launcher", "run on a SLURM login node"),
    # issue 19, fault 13: Hydra-level errors, in our form, exit 2, with a did-you-mean
    ("unknown-key", ["model.foo=1"], "model.foo", "model.foo is not a config key"),
    ("typo-did-you-mean", ["expert=8"], "expert", "did you mean experts=8?"),
    ("unquoted-unicode", ["data.name=données"], "data.name", "quoted, e.g. 'data.name=\"données\"'"),
    # fault 12: refused before Hydra creates the directory it names
    ("task-name-traversal", [f"task_name=../../{ESCAPE}", "logger=none"], "task_name", "must be one folder name"),
    # a setting wrong for every job of a sweep: once, before any job starts
    ("sweep-wide-error", ["-m", "experts=2,4", "trainer.max_steps=100", "trainer.val_check_interval=500", "logger=none"],
     "trainer.val_check_interval", "(all 2 jobs of this sweep; none was started)"),
    # more hostile inputs, each a Hydra traceback or a multi-line dump before
    ("group-set-to-null", ["debug=null"], "debug", "a config group cannot be set to null"),
    ("remove-a-list-group", ["~logger"], "logger", "choose an option instead, e.g. logger=none"),
    ("plus-on-an-existing-key", ["+experts=8"], "experts", "set it without the +: experts=8"),
    ("key-under-the-wrong-parent", ["trainer.lr=1e-3"], "trainer.lr", "did you mean optim.lr=1e-3?"),
    ("sweep-without-multirun", ["experts=2,4"], "experts", "add -m to run one job per value"),
    ("unclosed-list", ["tags=[a,b"], "tags", "cannot be parsed as an override"),
]


@pytest.mark.parametrize("args,key,fix", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(tmp_path, args, key, fix):
    # an empty PATH: this machine may have a real SLURM, and nothing here may ever reach sbatch
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    assert shutil.which("sbatch", path=str(empty_bin)) is None
    proc = run_train_cli(*args, cwd=tmp_path, env={"PATH": str(empty_bin)}, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: ") and fix in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not (tmp_path.parent / ESCAPE).exists() and not (tmp_path / ESCAPE).exists()
    if args[0] == "-m" and key != "hydra/launcher":  # reported before the sweep: no job directory either
        assert not (tmp_path / "outputs").exists()


def test_names_cannot_climb_out_of_their_directory():
    from sectional_moe.runs.identity import run_key, safe_name, sweep_group

    assert sweep_group("..", []) not in (".", "..") and "/" not in sweep_group("../../x", [])
    assert safe_name(".") == "_" and run_key("", 0) == "seed=0"
