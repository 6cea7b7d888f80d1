"""Train one model (or a sweep with -m). See README.md; configs live in conf/.

Thin on purpose: ``--help`` and ``--cfg job`` never import torch or Lightning; the run itself is
:func:`sectional_moe.training.run.main`.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sectional_moe import resolvers, secrets
from sectional_moe.training.overrides import check_cli_overrides_or_exit

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from sectional_moe.training.run import main as run  # torch and Lightning load only when a run starts

    return run(cfg)


if __name__ == "__main__":
    secrets.register_override_secrets(sys.argv[1:])  # +hf_token=...: redacted in run names, Hydra's logs and files
    secrets.redact_log_records()
    resolvers.register()
    check_cli_overrides_or_exit(sys.argv[1:], CONF_DIR)  # one clear line for typos, unknown keys, bad options
    main()
