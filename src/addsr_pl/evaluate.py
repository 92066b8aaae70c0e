"""Evaluation entry point: `python -m addsr_pl.evaluate student=<run dir>/student [overrides]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from addsr_pl.evaluation.runner import Evaluation
from addsr_pl.paths import config_dir


def evaluate(cfg: DictConfig) -> dict:
    """Score the configured methods; returns the written files by kind."""
    return Evaluation(cfg).run()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    for kind, path in evaluate(cfg).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
