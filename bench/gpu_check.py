"""Sections of `bench/gpu_check.sh`, each writing one JSON object: graph breaks, degradation, the
`gpu`-marked tests, the compile cache's warm start, merge.

python bench/gpu_check.py graph-breaks --json OUT/graph_breaks.json
python bench/gpu_check.py degradation --json OUT/degradation.json [--smoke]
python bench/gpu_check.py gpu-tests --json OUT/gpu_tests.json   # pytest -m gpu, outcome per test
python bench/gpu_check.py warm-start --json OUT/warm_start.json [--smoke]
python bench/gpu_check.py merge OUT          # OUT/*.json -> OUT/gpu_check.json and OUT/gpu_check.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# Sections merged into gpu_check.json, in this order (each from OUT/<key>.json; missing: null).
SECTIONS = (
    "inference",
    "degradation",
    "train_step",
    "train_step_large",
    "train_step_auto",
    "train_step_compiled",
    "ddp_scaling",
    "graph_breaks",
    "gpu_tests",
    "warm_start",
)


def graph_breaks(cache_dir: str, presets: list[str]) -> dict:
    """torch._dynamo.explain break counts on the tiny presets (breaks depend on code, not on sizes):
    `tiny_seesr` gives the SeeSR denoiser step and whole sampler, `tiny` the plain SD2 sampler."""
    import inference

    from addsr_pl.models.conditioning import Conditioning

    counts = {}
    for name in presets:
        parts, cond, timesteps, psr_weight = inference.compose_model(name, cache_dir)
        speed = inference.speed_for("ours_eager", torch.device("cpu"), "none")
        pipeline = inference.ours(
            parts, cond, timesteps, psr_weight, speed, torch.device("cpu"), tiny_psr=False
        )
        lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        lr_up, text, representation, ts, _, noises = pipeline._inputs(lr, 2, None, None)
        with torch.no_grad():
            if name == "tiny_seesr":
                z = torch.randn(1, 4, *(s // pipeline.codec.scale_factor for s in lr_up.shape[-2:]))
                step = torch._dynamo.explain(pipeline.denoiser)(
                    z, ts[:1], lr_up, Conditioning(text, representation)
                )
                counts["seesr_denoiser_step"] = step.graph_break_count
            whole = torch._dynamo.explain(pipeline.final_image)(
                [lr_up, text, representation, ts, None, *noises], (psr_weight, None)
            )
            # what `__call__` compiles and captures: with prompts built on the device, the tagger, the
            # prompt ids and the text encoder too (issue: the whole call in one graph)
            call, make_inputs = pipeline._whole_call()
            whole_call = torch._dynamo.explain(call)(make_inputs(lr, 2, None, None), (psr_weight, None))
        family = "seesr" if name == "tiny_seesr" else "sd2"
        counts[f"{family}_whole_sampler"] = whole.graph_break_count
        counts[f"{family}_whole_call"] = whole_call.graph_break_count
        torch._dynamo.reset()
    return counts


def degradation(smoke: bool, device: str) -> dict:
    """Pairs per second of the batched degradation vs its per-sample path, batch 16 (4 in the smoke run)."""
    import degradation as bench

    from addsr_pl.data.datasets import SampleDataset

    batch, size, iters = (4, 128, 1) if smoke else (16, 512, 5)
    photos = SampleDataset(bench.PHOTOS, crop_size=size, repeats=-(-batch // len(bench.PHOTOS)), seed=0)
    hr = torch.stack([photos[i]["hr"] for i in range(batch)]).to(device)
    module = bench.load_preset("addsr", 4).to(device)
    with torch.no_grad():
        results = bench.time_interleaved(
            {"batched": bench.batched, "per_sample": bench.one_by_one}, module, hr, iters
        )
    return {"device": device, "batch": batch, "hr_size": size, "iters": iters,
            "pairs_per_s": results, "speedup": results["batched"]["median"] / results["per_sample"]["median"]}  # fmt: skip


def gpu_tests(junit: Path) -> dict:
    """`pytest -m gpu` (skipped without CUDA): counts and each test's outcome, from pytest's JUnit XML."""
    import subprocess
    import xml.etree.ElementTree as ElementTree

    root = BENCH.parent
    # only the files that hold a gpu-marked test: collecting the whole suite imports every test module
    files = sorted(str(f) for f in (root / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
         *files],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        found = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[name] = found[0] if found else "passed"
    # JUnit's tag of each outcome under the name the JSON counts it by
    tags = {"passed": "passed", "failed": "failure", "error": "error", "skipped": "skipped"}
    counts = {name: sum(v == tag for v in outcomes.values()) for name, tag in tags.items()}
    return {"returncode": run.returncode, **counts, "tests": outcomes}


def warm_start(model: str, device: str, lr_size: int, steps: int, mode: str, cache_dir: str) -> dict:
    """The compile cache across processes: a fresh process compiles the pipeline (ours, compile `mode`
    per module, under the whole-sampler CUDA graph on CUDA) into an empty cache folder; a second one,
    same settings, loads it. Each reports its first call's seconds (dynamo tracing, compiling or loading,
    capture) and torch's cache counters."""
    import subprocess
    import tempfile

    result = {"model": model, "device": device, "lr_size": lr_size, "steps": steps, "compile": mode}
    with tempfile.TemporaryDirectory() as root:
        for phase in ("cold", "warm"):
            child = subprocess.run(
                [sys.executable, __file__, "warm-start-child", "--model", model, "--device", device,
                 "--lr-size", str(lr_size), "--steps", str(steps), "--compile-mode", mode,
                 "--cache-dir", cache_dir, "--compile-cache", root],
                capture_output=True, text=True,
            )  # fmt: skip
            if child.returncode != 0:
                raise RuntimeError(f"warm-start {phase} process failed:\n{child.stderr[-3000:]}")
            result[phase] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{phase}: {json.dumps(result[phase])}", flush=True)
    result["warm_over_cold"] = result["warm"]["first_call_s"] / result["cold"]["first_call_s"]
    return result


def warm_start_child(model: str, device: str, lr_size: int, steps: int, mode: str, cache_dir: str, root: str):
    """One process of `warm_start`: prints its first compiled call as one JSON line."""
    import time

    import inference

    from addsr_pl.upscale import defaults

    started = time.perf_counter()
    device = torch.device(device)
    parts, cond, timesteps, psr_weight = inference.compose_model(model, cache_dir)
    speed = inference.speed_for("ours_compiled", device, mode)
    pipeline = inference.ours(parts, cond, timesteps, psr_weight, speed, device, tiny_psr=False)
    estimate = defaults()["compile_estimate_s"]
    cache = pipeline.compile_cache_for(f"bench model {model}", root, estimate)
    cache.activate()
    lr = torch.rand(1, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(0)).to(device)
    signature = (1, lr_size, lr_size, steps)
    notice = cache.before(signature)
    inference.synchronize(device)
    pipeline(lr, steps=steps, generator=torch.Generator(device=device).manual_seed(0))
    inference.synchronize(device)
    seconds, loaded, compiled = cache.after(signature)
    print(json.dumps({"notice": str(notice), "first_call_s": seconds, "graphs_loaded": loaded,
                      "graphs_compiled": compiled, "process_s": time.perf_counter() - started}))  # fmt: skip


def merge(out: Path) -> dict:
    result = {}
    for key in SECTIONS:
        path = out / f"{key}.json"
        result[key] = json.loads(path.read_text()) if path.is_file() else None
    smi = out / "nvidia-smi.txt"
    result["nvidia_smi"] = smi.read_text() if smi.is_file() else None
    times = out / "seconds.json"
    result["seconds"] = json.loads(times.read_text()) if times.is_file() else None
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["# GPU check", ""]
    if result.get("nvidia_smi"):
        lines += ["```", result["nvidia_smi"].strip(), "```", ""]
    inference = result.get("inference") or {}
    for run in inference.values():
        if not isinstance(run, dict) or "models" not in run:
            continue
        lines += [f"## Inference on {run['device']}, LR {run['lr_size']}² -> SR {4 * run['lr_size']}²", ""]
        if not run.get("complete", True):
            lines += ["Stopped before its end (time limit or error): what follows is what had finished.", ""]
        lines += ["| model | row | steps | median ms | best ms | first call s | peak GiB | / eager fp16 |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for model, data in run["models"].items():
            for r in data["rows"]:
                ratio = data["ratios"].get(f"{r['row']}_{r['steps']}step")
                peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
                lines.append(
                    f"| {model} | {r['row']} | {r['steps']} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | "
                    f"{r['first_call_s']:.1f} | {peak} | {'' if ratio is None else f'{ratio:.3f}'} |"
                )
            for key in ("breakdown", "flops", "tiled", "throughput"):
                if key in data:
                    lines.append(f"\n{model} {key}: `{json.dumps(data[key])}`")
        lines.append("")
    for key in (*SECTIONS[1:], "seconds"):  # inference's tables are above
        if result.get(key) is None:
            lines += [f"## {key}", "", "Not written: the section did not run, or stopped before writing.", ""]
        else:
            lines += [f"## {key}", "", "```json", json.dumps(result[key], indent=2), "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "section",
        choices=["graph-breaks", "degradation", "gpu-tests", "warm-start", "warm-start-child", "merge"],
    )
    p.add_argument("out", nargs="?", type=Path, help="merge: the output folder")
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default="/tmp/addsr_pl_bench")
    p.add_argument("--presets", default="tiny_seesr,tiny", help="graph-breaks: tiny presets to trace")
    p.add_argument(
        "--model", default=None, help="warm-start: a model of bench/inference.py (sd2; smoke: tiny)"
    )
    p.add_argument("--lr-size", type=int, default=None, help="warm-start: LR side (128; smoke: 8)")
    p.add_argument("--steps", type=int, default=None, help="warm-start: student steps (4; smoke: 1)")
    p.add_argument("--compile-mode", default="default", help="warm-start: the torch.compile mode")
    p.add_argument("--compile-cache", default=None, help="warm-start-child: the cache folder")
    args = p.parse_args()
    if args.section == "merge":
        merge(args.out)
        return
    warm = (args.model or ("tiny" if args.smoke else "sd2"), args.device, args.lr_size or (8 if args.smoke else 128),
            args.steps or (1 if args.smoke else 4), args.compile_mode, args.cache_dir)  # fmt: skip
    if args.section == "warm-start-child":
        warm_start_child(*warm, args.compile_cache)
        return
    if args.section == "graph-breaks":
        result = graph_breaks(args.cache_dir, args.presets.split(","))
    elif args.section == "gpu-tests":
        result = gpu_tests(args.json.with_suffix(".xml"))
    elif args.section == "warm-start":
        result = warm_start(*warm)
    else:
        result = degradation(args.smoke, args.device)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.section == "gpu-tests" and result["returncode"] != 0:
        sys.exit(1)  # the section fails as the tests did; the JSON says which


if __name__ == "__main__":
    main()
