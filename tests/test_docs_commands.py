"""Every shell command of README.md and docs/*.md runs as written, so the docs cannot drift from the code.

The fenced ```bash / ```sh / ```console blocks are extracted, continuation lines joined, and each command
is run with bash, in document order, in a copy of the repository (one copy per document, so a command
may use what an earlier one of its document wrote, as a reader would). How a command is run:

* The interpreter's `bin/` folder comes first on PATH, as after `source .venv/bin/activate` (which the
  README asks for), so `python` and `addsr-pl` are this environment's; PYTHONPATH points at the copy's
  `src/`, WANDB_MODE=offline, and the run has no GPU. The documents run at once (each in its own
  thread and copy), so each command gets one torch thread (OMP_NUM_THREADS=1).
* Placeholder inputs are created first in the copy: `photo.png` and `photos/` (small photos),
  `hr_images/` (six HR images), and `/data/RealSR` (tiny LR/HR pairs; the path is rewritten to the
  copy's `data/RealSR`).
* Commands that cannot run here are skipped by a visible rule, and every skipped command is printed
  with its rule (`pytest -s` shows them; the list is also in the assertion message on failure):
  a `<!-- doc-test: skip REASON -->` line right above a block skips the block; otherwise SKIP_RULES
  (weights, a GPU, a dataset at full length, the network, incomplete commands with `...`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "console")
BLOCK_SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s+(.+?)\s*-->")
# (pattern, reason): a command matching a pattern is not run here
SKIP_RULES = [
    (r"model=sd2|/weights/|--preset (sd2|seesr)(?!.*--plan-only)", "needs: weights (SD2 / SeeSR)"),
    (
        r"trainer=(gpu|ddp|ddp_zero)\b|trainer\.devices=8|^torchrun|^srun|--device cuda|-m gpu"
        r"|bench/gpu_check\.sh(?!.*--smoke)",
        "needs: gpu",
    ),
    (r"/data/hr\b", "needs: data (your HR images, full-length training)"),
    (r"^pip install|^make wheelhouse|WANDB_MODE=online|^wandb sync", "needs: network"),
    (r"(^|\s)\.\.\.(\s|$)", "not a complete command (`...`)"),
]
# these placeholder paths are created in the copy and rewritten to it
PATH_PLACEHOLDERS = {"/data/RealSR": "data/RealSR"}
TIMEOUT_S = 600


def shell_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, block text, skip reason) for each fenced shell block of a Markdown file."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in SHELLS:
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = BLOCK_SKIP.search(above)
            blocks.append((i + 1, "\n".join(lines[i + 1 : end]), marker.group(1) if marker else None))
        i = end + 1
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only lines and `$ ` prompts dropped."""
    out, current = [], ""
    for line in block.splitlines():
        line = line.removeprefix("$ ")
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.strip() if current else line.rstrip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        out.append(current.strip())
        current = ""
    return out


def skip_reason(command: str) -> str | None:
    return next((reason for pattern, reason in SKIP_RULES if re.search(pattern, command)), None)


def all_commands() -> list[tuple[Path, int, str, str | None]]:
    found = []
    for doc in DOCS:
        for line, block, marker in shell_blocks(doc):
            for command in commands(block):
                found.append((doc, line, command, f"marked: {marker}" if marker else skip_reason(command)))
    return found


def copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "outputs", "multirun", "__pycache__", "*.egg-info", ".*cache"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    rng = np.random.default_rng(0)

    def photo(path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)

    photo(dest / "photo.png", 64)
    for index in range(6):
        photo(dest / "hr_images" / f"{index}.png", 160)
    for name in ("a", "b"):
        photo(dest / "photos" / f"{name}.png", 64)
        photo(dest / "data" / "RealSR" / "test_HR" / f"{name}.png", 64)
        photo(dest / "data" / "RealSR" / "test_LR" / f"{name}.png", 16)
    return dest


def run_env(copy: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HYDRA"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        PYTHONPATH=str(copy / "src"),
        WANDB_MODE="offline",
        WANDB_DIR=str(home),
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


def test_the_extraction_finds_the_documented_commands():
    found = all_commands()
    readme = [c for d, _, c, _ in found if d.name == "README.md"]
    assert "make demo" in " ".join(readme) and any(c.startswith("python -m addsr_pl.train") for c in readme)
    assert commands("a \\\n  b  # note\n# only a comment\n$ c") == ["a b  # note", "c"]
    assert skip_reason("python -m addsr_pl.train model=sd2 trainer=gpu") == "needs: weights (SD2 / SeeSR)"
    assert skip_reason("python -m addsr_pl.train model=tiny trainer=cpu trainer.max_steps=1") is None


def run_document(doc: Path, runnable: list[tuple[int, str]], folder: Path) -> str | None:
    """The document's commands in order in its own copy of the repository: None when each exits 0 without
    bitsandbytes' kernel warning, else what the first one that did not printed."""
    copy = copy_repo(folder / "repo")
    env = run_env(copy, folder)
    for line, command in runnable:
        written = command
        for placeholder, local in PATH_PLACEHOLDERS.items():
            command = command.replace(placeholder, str(copy / local))
        proc = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            return f"{doc.name}:{line}: `{written}` exited {proc.returncode}:\n{output[-3000:]}"
        # a message every start printed once (an eager third-party import), never to come back
        if "gemm_4bit_forward" in output or "quantization-bitsandbytes" in output:
            return f"{doc.name}:{line}: `{written}` printed bitsandbytes' kernel warning"
    return None


@pytest.mark.slow  # a few tiny trainings, an upscale and an evaluation on the CPU, each a new process
def test_documented_commands_run_as_written(tmp_path):
    """The documents at once, each in its own thread and copy (a command is a process: on another core
    where there is one), each document's commands in order."""
    plans, extracted = {}, all_commands()
    for doc in DOCS:
        found = [(line, command, reason) for d, line, command, reason in extracted if d == doc]
        skipped = [f"  {doc.name}:{line}: [{reason}] {command}" for line, command, reason in found if reason]
        print(f"\n{doc.name}: {len(found) - len(skipped)} run, {len(skipped)} skipped", *skipped, sep="\n")
        runnable = [(line, command) for line, command, reason in found if not reason]
        if runnable:
            plans[doc] = runnable
        else:
            print(f"{doc.name}: no command runs without weights, a GPU or the network")
    assert REPO / "README.md" in plans
    with ThreadPoolExecutor(len(plans)) as pool:
        runs = [
            pool.submit(run_document, doc, runnable, tmp_path / doc.stem) for doc, runnable in plans.items()
        ]
        failures = [failure for run in runs if (failure := run.result())]
    assert not failures, "\n\n".join(failures)
