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


def pairs_per_second(fn, module, hr, iters: int) -> tuple[float, float, float]:
    """Median and best pairs per wall-clock second over `iters` timed batches, and the median CPU
    seconds this process spent per pair. On a shared machine the best batch is the one least
    disturbed by other processes; CPU seconds do not count time spent waiting for a core."""
    fn(module, hr, 0)  # warm-up
    sync = torch.cuda.synchronize if hr.device.type == "cuda" else (lambda: None)
    walls, cpus = [], []
    for i in range(iters):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(module, hr, i + 1)
        sync()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    pairs = hr.shape[0]
    return pairs / statistics.median(walls), pairs / min(walls), statistics.median(cpus) / pairs


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
        results = {}
        for name, fn in (("batched (ours)", batched), ("one sample at a time", one_by_one)):
            median, best, cpu = pairs_per_second(fn, module, hr, args.iters)
            results[name] = median
            print(
                f"{name:22s} {median:7.2f} pairs/s median  {best:7.2f} best  {cpu:6.3f} CPU s/pair",
                flush=True,
            )
    ours, reference = results.values()
    print(f"speed-up (median): {ours / reference:.2f}x")
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
