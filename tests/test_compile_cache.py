"""Compiled graphs kept per machine: entries keyed by model, dtype, device, torch and compile settings;
torch's caches reused through them; a second process of the real CLI loads what the first compiled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from addsr_pl.inference.compile_cache import CompileCache, architecture_digest, cache_key
from addsr_pl.upscale import defaults
from addsr_pl.upscale import main as upscale_main

from conftest import one_thread

ROOT = Path(__file__).resolve().parents[1]
SPEED = {"compile": "default", "compile_scope": "modules", "channels_last": False}


def key(**changes) -> dict:
    base = {
        "model": architecture_digest("{}", [torch.nn.Linear(2, 3)]),
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "speed": SPEED,
    }
    base |= changes
    return cache_key(base["model"], base["dtype"], base["device"], base["speed"])


def test_each_part_of_the_key_makes_a_new_entry(tmp_path):
    entry = CompileCache(tmp_path, key(), 100).folder
    assert CompileCache(tmp_path, key(), 100).folder == entry
    changed = [
        key(model=architecture_digest("{}", [torch.nn.Linear(2, 4)])),  # another architecture
        key(model=architecture_digest('{"scale": 2}', [torch.nn.Linear(2, 3)])),  # another manifest
        key(dtype=torch.bfloat16),
        key(speed={**SPEED, "compile": "max-autotune-no-cudagraphs"}),
        key(speed={**SPEED, "compile_scope": "sampler"}),
        key(speed={**SPEED, "channels_last": True}),
        {**key(), "torch": "0.0.0"},
        {**key(), "device": "NVIDIA H100 80GB HBM3 sm90"},
    ]
    folders = {CompileCache(tmp_path, k, 100).folder for k in changed}
    assert entry not in folders and len(folders) == len(changed)


def test_weights_and_locations_do_not_change_the_model_digest_but_configs_do():
    torch.manual_seed(0)
    a = torch.nn.Linear(2, 3)
    torch.manual_seed(1)
    b = torch.nn.Linear(2, 3)
    assert not torch.equal(a.weight, b.weight)
    assert architecture_digest("{}", [a]) == architecture_digest("{}", [b])
    # constants of a model's config are compiled into its code; where it was loaded from is not
    a.config, b.config = {"scaling_factor": 0.18, "_name_or_path": "/here"}, {"scaling_factor": 0.18}
    assert architecture_digest("{}", [a]) == architecture_digest("{}", [b])
    b.config = {"scaling_factor": 0.13}
    assert architecture_digest("{}", [a]) != architecture_digest("{}", [b])


@pytest.fixture
def inductor_folder_restored():
    """TORCHINDUCTOR_CACHE_DIR as it was after the test, and torch's paths derived from it forgotten."""
    from torch._inductor.utils import clear_caches

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    yield
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    clear_caches()
    torch._dynamo.reset()


def test_torch_reuses_the_graphs_of_an_entry_and_the_notice_says_so(tmp_path, inductor_folder_restored):
    """A function compiled under an entry, compiled again after dynamo forgot it: the second compile
    loads from the entry's folder (torch's cache hit counters), and the notices tell the two apart,
    with the first compile's recorded seconds as the next estimate."""

    def compiled_call(cache: CompileCache, signature) -> tuple:
        torch._dynamo.reset()
        cache.activate()
        function = torch.compile(lambda x: torch.relu(x @ x.T + 1), dynamic=False)
        notice = cache.before(signature)
        function(torch.ones(4, 4))
        return notice, cache.after(signature)

    first, (seconds, loaded, compiled) = compiled_call(CompileCache(tmp_path, key(), 77), [1, 4])
    assert str(first) == "compiling (first time on this machine, about 77 s)"
    assert compiled > 0 and loaded == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path / "cpu-float32"))
    again, (_, loaded, compiled) = compiled_call(CompileCache(tmp_path, key(), 77), [1, 4])
    assert str(again) == "loaded compiled graphs"
    assert loaded > 0 and compiled == 0
    other = CompileCache(tmp_path, key(dtype=torch.float64), 77)
    recorded = round(seconds, 1)  # the entry keeps tenths: 16.46 s is recorded 16.5 and announced 16
    assert str(other.before([1, 4])) == f"compiling (first time on this machine, about {round(recorded)} s)"


@pytest.mark.slow
def test_a_second_process_of_the_cli_loads_the_first_ones_graphs(tiny_student, tmp_path):
    """The real CLI twice with --compile (about 100 s of compiling on one CPU core, then seconds), and
    the CLI's eager run in this process while the first one compiles: the compiled output is the eager one
    to within 8-bit rounding."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    arguments = [
        str(tmp_path / "a.png"), "--model", str(tiny_student), "--steps", "1", "--no-progress",
        "--compile-cache", str(tmp_path / "cache"), "--device", "cpu",
    ]  # fmt: skip
    command = [sys.executable, "-m", "addsr_pl.upscale", *arguments, "--compile", "default",
               "--compile-scope", "modules"]  # fmt: skip
    runs = []
    for name in ("first", "second"):
        run = subprocess.Popen(
            [*command, "-o", str(tmp_path / f"{name}.png")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if name == "first":  # the eager run (compile: none, the tiny student's setting) meanwhile
            try:
                with one_thread():
                    assert upscale_main([*arguments, "-o", str(tmp_path / "eager.png")]) == 0
            except BaseException:
                run.kill()
                raise
        _, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stderr[-3000:]
        runs.append(stderr)
    entries = list((tmp_path / "cache").iterdir())  # torch wrote its graphs into our entry
    assert len(entries) == 1 and any((entries[0] / "inductor" / "fxgraph").iterdir())
    estimate = defaults()["compile_estimate_s"]
    assert f"compiling (first time on this machine, about {estimate} s)" in runs[0]
    assert "loaded compiled graphs" in runs[1] and "compiling" not in runs[1]
    loaded, compiled = map(int, re.search(r"(\d+) graphs loaded from .*, (\d+) compiled", runs[1]).groups())
    assert loaded > 0 and compiled == 0
    first = np.asarray(Image.open(tmp_path / "first.png")).astype(int)
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "second.png")))
    # the compiled modules compute what eager ones do: within one 8-bit level of the eager CLI's output
    assert np.abs(first - np.asarray(Image.open(tmp_path / "eager.png")).astype(int)).max() <= 1
