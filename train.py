"""Train one model (or a sweep with -m). See README.md; configs live in conf/."""

import sys

import hydra
from omegaconf import DictConfig

import sectional_moe.runs  # noqa: F401  (registers the resolvers used by conf/hydra/default.yaml)
from sectional_moe.train import check_cli_or_exit, main as run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    check_cli_or_exit(sys.argv[1:])  # one clear line for routing=foo-style typos, instead of Hydra's dump
    main()
