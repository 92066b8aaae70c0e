"""How ours scales over the GPUs of one machine: samples/s at 1 and N devices (`trainer=ddp`'s strategy).

    python bench/ddp_scaling.py --preset seesr --devices 8 --batch 2 --json scaling.json
    python bench/ddp_scaling.py --tiny --devices 2          # CPU, gloo: a smoke run of the script

Each device count runs in its own process group (a worker process; Lightning starts the worker's other
ranks): ours (`AddSRModule`, the `PartsDDPStrategy` of conf/trainer/ddp.yaml) at `--batch` per device,
random weights and images, `--warmup` untimed then `--iters` timed iterations on rank 0, median. It prints
per device count the ms per iteration, samples/s over all devices and the MiB all-reduced per iteration
(`train/allreduce_mib`), then the scaling efficiency: samples/s at N over N times samples/s at 1 (1.0 is
perfect). The gradient all-reduce overlaps the backward in buckets (`bucket_cap_mb`), so the efficiency
measures what the overlap leaves of the communication.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from train_step import CROP, PRESETS, IterationTimer, compose_preset, fit_ours

from addsr_pl.method.distributed import PartsDDPStrategy
from addsr_pl.method.module import AddSRModule

# conf/trainer/ddp.yaml's bucket size
BUCKET_CAP_MB = 25


def worker(args) -> None:
    """One device count: fit ours, rank 0 writes its timings to `args.json`."""
    device = torch.device("cpu" if args.tiny else "cuda")
    preset = "tiny" if args.tiny else args.preset
    crop = CROP[preset]
    module = AddSRModule(**compose_preset(preset, args.overrides))
    timer = IterationTimer(device, args.warmup, False)
    total = args.warmup + args.iters
    strategy = (
        PartsDDPStrategy(
            find_unused_parameters=False,
            bucket_cap_mb=BUCKET_CAP_MB,
            process_group_backend="gloo" if device.type == "cpu" else "nccl",
        )
        if args.devices > 1
        else "auto"
    )
    fit_ours(module, args.batch, crop, device, timer, total, args.devices, strategy)
    if module.global_rank == 0:
        ms = statistics.median(timer.times) * 1000
        result = {
            "devices": args.devices,
            "batch_per_device": args.batch,
            "ms_per_iteration": ms,
            "samples_per_s": args.devices * args.batch / (ms / 1000),
            "allreduce_mib_per_iteration": module.allreduced_bytes / 2**20,
        }
        Path(args.json).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=[p for p in PRESETS if p != "tiny"], default="seesr")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on the CPU, gloo (smoke run)")
    parser.add_argument("--devices", type=int, default=None, help="N (default: every visible GPU; tiny: 2)")
    parser.add_argument("--batch", type=int, default=2, help="per device")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3; tiny 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10; tiny 2)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for ours (method.speed.*=...)")
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.iters = args.iters if args.iters is not None else (2 if args.tiny else 10)
    if args.worker:
        worker(args)
        return
    devices = args.devices or (2 if args.tiny else torch.cuda.device_count())
    if devices < 2:
        skipped = f"{devices} device(s): scaling needs at least 2"
        print(skipped, flush=True)
        result = {"skipped": skipped}
    else:
        runs = {}
        with tempfile.TemporaryDirectory() as folder:
            for n in (1, devices):
                out = Path(folder) / f"{n}.json"
                command = [sys.executable, __file__, "--worker", "--devices", str(n), "--batch", str(args.batch),
                           "--warmup", str(args.warmup), "--iters", str(args.iters), "--json", str(out),
                           *(["--tiny"] if args.tiny else ["--preset", args.preset]), *args.overrides]  # fmt: skip
                subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                runs[n] = json.loads(out.read_text())
                r = runs[n]
                print(
                    f"{n} device(s), batch {args.batch} each: {r['ms_per_iteration']:.1f} ms/iteration, "
                    f"{r['samples_per_s']:.2f} samples/s, {r['allreduce_mib_per_iteration']:.1f} MiB all-reduced "
                    "per iteration",
                    flush=True,
                )
        efficiency = runs[devices]["samples_per_s"] / (devices * runs[1]["samples_per_s"])
        note = " (CPU smoke run, not a measurement)" if args.tiny else ""
        print(f"scaling efficiency at {devices} devices: {efficiency:.2f}{note}", flush=True)
        result = {
            "preset": "tiny" if args.tiny else args.preset,
            "device": "cpu" if args.tiny else torch.cuda.get_device_name(0),
            "runs": [runs[1], runs[devices]],
            "efficiency": efficiency,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
