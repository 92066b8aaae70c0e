"""Per-rank optimizer-state bytes of `trainer=ddp_zero` (ZeRO-1) against the plain AdamW of `trainer=ddp`.

    python bench/sharded_optimizer.py --model tiny --world 2

Builds the AddSR module of a model preset in each of `--world` CPU processes (gloo), gives the
student's and the discriminator's trainable parameters a gradient, steps both optimizers once, and
counts the optimizer-state bytes each rank holds: AdamW as configured (`method.optimizer_g/d`) and
the same AdamW inside `torch.distributed.optim.ZeroRedundancyOptimizer`, in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.optim import ZeroRedundancyOptimizer

from addsr_pl.method.module import AddSRModule
from addsr_pl.paths import config_dir


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


def worker(rank: int, world: int, port: int, model: str, run_dir: str, out: dict) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"model={model}", f"hydra.run.dir={run_dir}"], return_hydra_config=True
        )
    HydraConfig().set_config(cfg)
    module = AddSRModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        conditioning=OmegaConf.to_container(cfg.conditioning, resolve=True),
        method=OmegaConf.to_container(cfg.method, resolve=True),
        seed=cfg.seed,
    )
    sizes = {}
    for phase, named in (("g", module.student_trainable()), ("d", module.discriminator_trainable())):
        params = [p for _, p in named]
        for p in params:
            p.grad = torch.ones_like(p)
        node = OmegaConf.to_container(cfg.method[f"optimizer_{phase}"], resolve=True)
        plain = instantiate(node, params=params)
        plain.step()
        node.pop("_target_")
        zero = ZeroRedundancyOptimizer(params, optimizer_class=type(plain), **node)
        zero.step()
        sizes[phase] = (state_bytes(plain), state_bytes(zero.optim), sum(p.numel() for p in params))
    out[rank] = sizes
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model preset (conf/model/)")
    parser.add_argument("--world", type=int, default=2, help="number of processes")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        run_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_sharded_optimizer")
        mp.spawn(worker, args=(args.world, port, args.model, run_dir, out), nprocs=args.world)
        results = dict(out)
    print(f"model={args.model} world={args.world} (gloo, CPU); optimizer-state bytes per rank")
    for phase, name in (("g", "student"), ("d", "discriminator")):
        plain = results[0][phase][0]
        print(
            f"  {name}: {results[0][phase][2]:,} trainable parameters, AdamW state {plain:,} B on every rank"
        )
        for rank in range(args.world):
            zero = results[rank][phase][1]
            print(f"    rank {rank}: ZeRO-1 {zero:,} B = {zero / plain:.3f} x AdamW")


if __name__ == "__main__":
    main()
