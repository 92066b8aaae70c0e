"""Pairs per second of the batched Real-ESRGAN degradation against a one-sample-at-a-time loop.

    python bench/degradation.py --device cpu --batch 16 --iters 3

Both run the same module and maths; the reference feeds one sample at a time (batch of 1), the
way a per-image data pipeline would. HR crops are 512² from the bundled sample photos, LR 128².
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from omegaconf import OmegaConf

from addsr_pl.data.datasets import SampleDataset
from addsr_pl.data.degradation import RealESRGANDegradation
from addsr_pl.paths import config_dir

PHOTOS = ["astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "chelsea", "rocket"]


def load_preset(name: str, scale: int) -> RealESRGANDegradation:
    cfg = OmegaConf.load(config_dir() / "data" / "degradation" / f"{name}.yaml")
    cfg.scale = scale
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    kwargs.pop("_target_")
    return RealESRGANDegradation(**kwargs)


def batched(module, hr, seed):
    return module(hr, torch.Generator(device=hr.device).manual_seed(seed))


def one_by_one(module, hr, seed):
    gen = torch.Generator(device=hr.device).manual_seed(seed)
    outs = [module(hr[b : b + 1], gen) for b in range(hr.shape[0])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def time_interleaved(fns: dict, module, hr, iters: int) -> dict[str, dict[str, float]]:
    """Time the implementations in turns, batch by batch, so that both see the same machine load.

    Returns per implementation the median and best pairs per wall-clock second and the median CPU
    seconds this process spent per pair. On a shared machine the best batch is the one least
    disturbed by other processes.
    """
    sync = torch.cuda.synchronize if hr.device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn(module, hr, 0)  # warm-up
    walls = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    for i in range(iters):
        for name, fn in fns.items():
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            fn(module, hr, i + 1)
            sync()
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - cpu_start)
    pairs = hr.shape[0]
    return {
        name: {
            "median": pairs / statistics.median(walls[name]),
            "best": pairs / min(walls[name]),
            "cpu": statistics.median(cpus[name]) / pairs,
        }
        for name in fns
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="HR crop side; LR is size/scale")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--preset", default="addsr", help="conf/data/degradation/<preset>.yaml")
    args = parser.parse_args()

    device = torch.device(args.device)
    photos = SampleDataset(PHOTOS, crop_size=args.size, repeats=-(-args.batch // len(PHOTOS)), seed=0)
    hr = torch.stack([photos[i]["hr"] for i in range(args.batch)]).to(device)
    module = load_preset(args.preset, args.scale).to(device)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}) "
        f"threads={torch.get_num_threads()} preset={args.preset} batch={args.batch} iters={args.iters} "
        f"HR {args.size}² -> LR {args.size // args.scale}²"
    )
    with torch.no_grad():
        results = time_interleaved(
            {"batched (ours)": batched, "one sample at a time": one_by_one}, module, hr, args.iters
        )
    for name, r in results.items():
        print(
            f"{name:22s} {r['median']:7.2f} pairs/s median  {r['best']:7.2f} best  {r['cpu']:6.3f} CPU s/pair"
        )
    ours, reference = (r["median"] for r in results.values())
    print(f"speed-up (median): {ours / reference:.2f}x")
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
