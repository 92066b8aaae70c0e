"""Where the project's configuration lives.

The Hydra tree is kept at the repository top (`conf/`) so that researchers edit it in place; an
installed copy can point elsewhere with ``ADDSR_PL_CONF``.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    """The folder holding `train.yaml`, `upscale.yaml`, `eval.yaml` and the config groups."""
    path = Path(os.environ.get("ADDSR_PL_CONF", PROJECT_ROOT / "conf"))
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"No Hydra config tree at {path} (expected {path / 'train.yaml'}). "
            "Run from a checkout of addsr-pl or set ADDSR_PL_CONF to its conf/ folder."
        )
    return path
