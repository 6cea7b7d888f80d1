"""Train one model (or a sweep with -m). See README.md; configs live in conf/."""

import hydra
from omegaconf import DictConfig

import sectional_moe.runs  # noqa: F401  (registers the resolvers used by conf/hydra/default.yaml)
from sectional_moe.train import main as run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
