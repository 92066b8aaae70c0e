"""Evaluation entry point: `python -m addsr_pl.evaluate student=<run dir>/student [overrides]`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from addsr_pl.core.student_format import StudentFolderError
from addsr_pl.evaluation.runner import Evaluation
from addsr_pl.paths import config_dir


def evaluate(cfg: DictConfig) -> dict:
    """Score the configured methods; returns the written files by kind."""
    return Evaluation(cfg).run()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        written = evaluate(cfg)
    except StudentFolderError as error:
        # a damaged or hostile student folder: the message names the file and the problem, no traceback
        print(f"addsr-pl evaluate: error: {error}", file=sys.stderr)
        sys.exit(2)
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
