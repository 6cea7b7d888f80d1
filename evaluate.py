"""Evaluate a trained checkpoint: test perplexity, prefill/decode throughput, a text sample.

    python evaluate.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt [data=...] [prompt="ROMEO:"]
    python evaluate.py "ckpt_path='outputs/train/runs/experts=8,seed=0/checkpoints/last.ckpt'"  # '=' or ',' in the path

See conf/eval.yaml and src/sectional_moe/evaluation/evaluate.py.
"""

import hydra
from omegaconf import DictConfig

from sectional_moe import resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from sectional_moe.evaluation.evaluate import main as run  # torch loads only when an evaluation starts

    run(cfg)


if __name__ == "__main__":
    resolvers.register()
    main()
