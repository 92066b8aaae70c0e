"""One AddSR training iteration: our AddSRModule (memory levers on) against a plain recipe, same run.

Both do the official recipe's work per iteration on random-weight models (speed and memory do not depend
on weight values): a 2-step student unroll with PSR (the first step without a graph, the graded one
decoded), the teacher at 4 timesteps per sample, pixel-space distillation, the generator's adversarial
term, a discriminator step, the optimiser steps and the EMA update.

- ours: `AddSRModule` trained by a Lightning Trainer (bf16-mixed on CUDA), with the `method.memory`
  levers of conf/method/addsr.yaml, at each batch of `--batch`; the largest batch whose peak stays
  under `--memory-cap` GiB is reported.
- baseline: the same work module by module in plain eager PyTorch with bf16 autocast at batch 2: the
  student a full copy of the teacher, no checkpointing, every decode at once, a per-parameter EMA and
  gradient norm, real and fake in separate discriminator passes, host reads of the logged losses.

Every row prints ms/iteration, samples/s, the peak memory, the FLOP of one iteration (counted by
`torch.utils.flop_counter` over one extra untimed iteration of the same run: checkpointing's recomputation
included), the TFLOP/s that achieves and its share of the card's dense bf16 peak (`BF16_PEAK_TFLOPS`), and
the hours the paper's 300K training samples would take at that rate. A name run at two or more batches also
gets its fixed part (what an iteration costs whatever the batch: launches, host work) and its per-sample
part, by least squares. Both rows tag exactly `TAGS_PER_IMAGE` tags per image with the random RAM.

Presets: `seesr` (SD2-base-sized SeeSR UNet + ControlNet with image cross-attention, a Swin-L RAM, the
full 23-layer text encoder, DINO ViT-S/16 + DINOv2 ViT-S/14), `sd2` (SD2-base UNet + ControlNet, fixed
prompt), `sd35_medium` and `sdxl` (the public SD3.5-medium and SDXL-base architectures with RAM and the same
discriminator; ours only), `--tiny` (the tiny SeeSR-style preset on the CPU: a smoke run of the script, not
a measurement). `--plan-only --trainable controlnet,lora` prints each set's static plan and what it leaves
of `--capacities` (24, 40, 80 GiB) for activations.

    python bench/train_step.py --preset seesr --batch 2,4,8 --memory-cap 20 --json out.json   # CUDA
    python bench/train_step.py --preset seesr --batch 2,4 --baseline-batch 2,4              # fixed parts
    python bench/train_step.py --tiny --json out.json                                         # CPU smoke
    python bench/train_step.py --preset sd35_medium --plan-only --trainable controlnet,lora   # any machine
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from addsr_pl.core.noise_schedule import noise_schedule_from
from addsr_pl.core.sampler import upscale
from addsr_pl.method.lever_plan import manual_choice
from addsr_pl.method.lever_probe import NOT_PROBED, probe_and_choose, set_levers, training_only_trainer
from addsr_pl.method.losses import discriminator_hinge_loss, distillation_loss, generator_loss, ta_weights
from addsr_pl.method.memory_plan import GIB, module_memory_plan
from addsr_pl.method.module import AddSRModule
from addsr_pl.models.backbones.sd2 import SD2Backbone
from addsr_pl.models.conditioning import build_tagger
from addsr_pl.models.trainable import has_image_attention
from addsr_pl.paths import config_dir

FULL_SIZE = [
    "model=sd2_random",
    "model/discriminator=projected_dino",
    "model.discriminator.backbone_weights=null",
    "model.discriminator.conditioner_weights=null",
    # SD2's text encoder uses 23 of OpenCLIP ViT-H's 24 text layers
    "model.components.text_encoder.num_hidden_layers=23",
]
# RAM with random weights: its architecture, no checkpoint files (a placeholder tag list is added below)
RANDOM_RAM = ["conditioning=ram", "conditioning.tagger._target_=addsr_pl.models.ram.RAMTagger.random"]
# the discriminator of every full-size preset: the paper's, random weights
FULL_SIZE_DISCRIMINATOR = FULL_SIZE[1:4]
PRESETS = {
    "seesr": [*FULL_SIZE, "+model.components.image_cross_attention_dim=512", *RANDOM_RAM],
    "sd2": [*FULL_SIZE, "conditioning=fixed"],
    # the paper's recipe on other backbones at their public sizes (the plan; the iteration on a GPU)
    "sd35_medium": ["model=sd35_medium_random", *FULL_SIZE_DISCRIMINATOR, *RANDOM_RAM],
    "sdxl": ["model=sdxl_random", *FULL_SIZE_DISCRIMINATOR, *RANDOM_RAM],
    "flux_dev": ["model=flux_dev_random", *FULL_SIZE_DISCRIMINATOR, *RANDOM_RAM],
    "tiny": ["model=tiny_seesr", "conditioning=tiny_ram"],
}
# the presets PlainRecipe (SD2's UNet + ControlNet written out) can run as the baseline
BASELINE_PRESETS = ("seesr", "sd2", "tiny")
# Nothing is read from these folders (random weights); set so that no Hydra run is needed to resolve them.
PATHS = ["paths.cache_dir=/tmp/addsr_pl_bench", "paths.weights_dir=/tmp/addsr_pl_bench/no_weights"]
# HR crop per preset (the LR is a quarter of it), as trained.
CROP = {"seesr": 512, "sd2": 512, "sd35_medium": 512, "sdxl": 512, "flux_dev": 512, "tiny": 32}
# device memories (GiB) the plan-only run reports the static plan against: 24 GB, 40 GB and 80 GB cards
PLAN_CAPACITIES_GIB = (24.0, 40.0, 80.0)
# RAM with random weights would pass about 2,300 of its 4,585 thresholds per image (tokenising such a prompt
# alone takes tens of ms); real images get about this many tags, so both rows tag exactly this many.
TAGS_PER_IMAGE = 20
# The paper's training: 50K iterations at batch 6.
PAPER_SAMPLES = 50_000 * 6
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a part of `torch.cuda.get_device_name`, first match
# wins; from the vendors' data sheets (SXM parts where both exist).
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
]
# Every iteration unrolls 2 student steps (k = 2, PSR), so both sides do the same work.
WORKLOAD = ["method.unroll_probs=[0,1]"]


def compose_preset(preset: str, extra: list[str]) -> dict:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*PRESETS[preset], *WORKLOAD, *extra, *PATHS],
        )
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "conditioning", "method")}
    if RANDOM_RAM[-1] in PRESETS[preset]:
        tagger = parts["conditioning"]["tagger"]
        for key in ("folder", "checkpoint", "tag_list", "tag_thresholds", "dape", "lora_alpha"):
            tagger.pop(key)
        n = tagger["architecture"]["num_classes"]
        # sigmoid(logit) lies in (0, 1): above 0 always, above 1 never, so the first TAGS_PER_IMAGE are on
        thresholds = [0.0] * TAGS_PER_IMAGE + [1.0] * (n - TAGS_PER_IMAGE)
        tagger |= {"tag_list": [f"tag{i}" for i in range(n)], "class_thresholds": thresholds}
    return parts | {"seed": int(cfg.seed)}


def random_batch(batch: int, crop: int, device: torch.device, generator: torch.Generator) -> dict:
    hr = torch.rand(batch, 3, crop, crop, generator=generator)
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    return {"hr": hr.to(device), "lr": lr.to(device)}


class RandomPairs(torch.utils.data.Dataset):
    def __init__(self, length: int, crop: int):
        self.length, self.crop = length, crop

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        batch = random_batch(1, self.crop, torch.device("cpu"), torch.Generator().manual_seed(i))
        return {k: v[0] for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def fresh_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------- ours
class IterationTimer(pl.Callback):
    """Times the iterations after `warmup`; with `count_flops`, the first iteration (untimed) runs under
    torch's FLOP counter. An iteration is `accumulate` training batches (micro-steps)."""

    def __init__(self, device: torch.device, warmup: int, count_flops: bool, accumulate: int = 1):
        self.device, self.times, self._start = device, [], 0.0
        self.counter = FlopCounterMode(display=False) if count_flops else None
        self.accumulate = accumulate
        self.untimed = warmup * accumulate

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        synchronize(self.device)
        if batch_idx == 0 and self.counter is not None:
            self.counter.__enter__()
        if batch_idx % self.accumulate == 0:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        synchronize(self.device)
        if batch_idx == self.accumulate - 1 and self.counter is not None:
            self.counter.__exit__(None, None, None)
        if batch_idx >= self.untimed and batch_idx % self.accumulate == self.accumulate - 1:
            self.times.append(time.perf_counter() - self._start)

    @property
    def flops(self) -> int | None:
        return None if self.counter is None else self.counter.get_total_flops()


def run_ours(
    module: AddSRModule,
    batch: int,
    crop: int,
    device,
    warmup: int,
    iters: int,
    count_flops: bool,
    accumulate: int = 1,
) -> tuple[list[float], int | None, float]:
    """(timed iteration seconds, FLOP of one iteration or None, seconds of the timed fit outside its timed
    iterations: start-up, warm-up and any compilation); an iteration is `accumulate` micro-batches
    of `batch`, timed and counted from its first micro-step's start to its last one's end. FLOPs do not
    depend on the speed settings: they are counted first, in a fit of one iteration with method.speed's
    compile and CUDA graphs off (a replayed graph would go uncounted; compiled code is not traced under the
    counter's dispatch mode), then the timed fit runs as configured."""
    flops = None
    if count_flops:
        speed = module.method["speed"]
        module.method["speed"] = speed | {"compile": "none", "cuda_graph": False}
        try:
            flops = fit_ours(
                module, batch, crop, device, IterationTimer(device, 1, True, accumulate), 1
            ).flops
        finally:
            module.method["speed"] = speed
    start = time.perf_counter()
    timer = fit_ours(
        module, batch, crop, device, IterationTimer(device, warmup, False, accumulate), warmup + iters
    )
    return timer.times, flops, time.perf_counter() - start - sum(timer.times)


def fit_ours(
    module: AddSRModule,
    batch: int,
    crop: int,
    device,
    timer: IterationTimer,
    iterations: int,
    devices: int = 1,
    strategy="auto",
):
    """`iterations` iterations of ours (each `timer.accumulate` micro-batches of `batch`, on each of
    `devices` under `strategy`) under `timer`."""
    accumulate = timer.accumulate
    module.method["accumulate_grad_batches"] = accumulate
    total = iterations * accumulate
    trainer = training_only_trainer(
        iterations,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        callbacks=[timer],
    )
    # the distributed sampler gives each device its share of the samples
    loader = torch.utils.data.DataLoader(
        RandomPairs(batch * total * devices, crop), batch_size=batch, pin_memory=device.type == "cuda"
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer


# ----------------------------------------------------------------------------------- baseline
class PlainRecipe:
    """The official recipe's iteration written module by module, without any of our levers."""

    def __init__(self, parts: dict, device: torch.device):
        m = self.method = parts["method"]
        self.device = device
        self.autocast = device.type == "cuda"
        frozen_dtype = torch.bfloat16 if self.autocast else torch.float32
        c = instantiate(parts["model"]["components"], _convert_="all")
        self.vae, self.text_encoder, self.tokenizer = c.vae, c.text_encoder, c.tokenizer
        self.schedule = noise_schedule_from(c.scheduler, "bench").to(device)
        cond = parts["conditioning"]
        self.tagger = build_tagger(cond["tagger"]) if cond.get("tagger") else None
        self.prompt, self.positive = cond["prompt"], cond["positive_prompt"]
        self.image_attention = has_image_attention(c.unet)
        self.unet_t, self.cn_t = c.unet, c.controlnet
        self.unet_s, self.cn_s = copy.deepcopy(c.unet), copy.deepcopy(c.controlnet)
        self.disc = instantiate(parts["model"]["discriminator"], _convert_="all")
        frozen = [
            self.vae,
            self.text_encoder,
            self.unet_t,
            self.cn_t,
            self.disc.backbone,
            self.disc.conditioner,
        ]
        frozen += [self.tagger] if self.tagger is not None else []
        for module in frozen:
            module.requires_grad_(False).eval().to(device, frozen_dtype)
        SD2Backbone().select_trainable(
            {"unet": self.unet_s, "controlnet": self.cn_s}, m["trainable"], m["lora"]
        )
        for module in (self.unet_s, self.cn_s):
            module.to(device)
            for p in module.parameters():
                p.data = p.data.to(frozen_dtype if not p.requires_grad else torch.float32)
        self.disc.heads.to(device)
        self.disc.to(device)
        self.trained = [
            p for model in (self.unet_s, self.cn_s) for p in model.parameters() if p.requires_grad
        ]
        self.opt_g = torch.optim.AdamW(self.trained, **optimizer_arguments(m["optimizer_g"]))
        self.opt_d = torch.optim.AdamW(self.disc.heads.parameters(), **optimizer_arguments(m["optimizer_d"]))
        self.ema = [p.detach().clone().float() for p in self.trained]
        self.student_t = torch.tensor(m["student_timesteps"], device=device)
        self.ta = ta_weights(m["ta_schedule"], len(m["student_timesteps"]), **m["ta"]).float().to(device)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def embed_text(self, images):
        tags = self.tagger(images).tags if self.prompt == "tags" else [""] * images.shape[0]
        texts = [", ".join(t for t in (tag, self.positive) if t) for tag in tags]
        out = []
        for text in texts:  # one text at a time
            ids = self.tokenizer(
                [text],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out.append(self.text_encoder(ids)[0])
        return torch.cat(out)

    def denoise(self, unet, controlnet, z, t, control, text, image):
        extra = {"image_encoder_hidden_states": image} if image is not None else {}
        down, mid = controlnet(
            z, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False, **extra
        )[:2]
        return unet(
            z,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **extra,
        )[0]

    def represent(self, images):
        return self.tagger.representation(images) if self.image_attention else None

    def decode(self, latents):
        return ((self.vae.decode(latents / self.vae.config.scaling_factor).sample.float() + 1) / 2).clamp(
            0, 1
        )

    def iteration(self, batch: dict) -> None:
        m, g, dev = self.method, self.generator, self.device
        hr, lr = batch["hr"], batch["lr"]
        b, n = hr.shape[0], m["teacher_timesteps_per_sample"]
        with torch.autocast(dev.type, torch.bfloat16, enabled=self.autocast):
            lr_up = upscale(lr, hr.shape[-2:])
            with torch.no_grad():
                text = self.embed_text(lr_up)
                hr_latent = self.vae.encode(hr * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor
                noise = torch.randn(hr_latent.shape, generator=g, device=dev)
                start = torch.randint(0, len(self.student_t) - 1, (b,), generator=g, device=dev)
                t1, t2 = self.student_t[start], self.student_t[start + 1]
                z1 = self.schedule.add_noise(hr_latent, noise, t1)
                eps = self.denoise(self.unet_s, self.cn_s, z1, t1, lr_up, text, self.represent(lr_up))
                control = self.decode(self.schedule.predict_x0(z1, eps, t1))  # PSR
            z2 = self.schedule.add_noise(hr_latent, noise, t2)
            eps = self.denoise(self.unet_s, self.cn_s, z2, t2, control, text, self.represent(control))
            x0 = self.schedule.predict_x0(z2, eps, t2)
            image = self.decode(x0)
            with torch.no_grad():  # teacher at n timesteps per sample, HR-conditioned, decoded at once
                t = torch.randint(0, 1000, (b * n,), generator=g, device=dev)
                z_t = self.schedule.add_noise(
                    x0.detach().repeat_interleave(n, 0), noise.repeat_interleave(n, 0), t
                )
                text_t, image_t = self.embed_text(hr), self.represent(hr)
                eps_t = self.denoise(
                    self.unet_t,
                    self.cn_t,
                    z_t,
                    t,
                    hr.repeat_interleave(n, 0),
                    text_t.repeat_interleave(n, 0),
                    None if image_t is None else image_t.repeat_interleave(n, 0),
                )
                target = self.decode(self.schedule.predict_x0(z_t, eps_t, t))
                c = self.disc.condition(lr_up)
            per_sample = distillation_loss(image, target, self.schedule.distillation_weight(t))
            loss_dis = (per_sample * self.ta[start + 1]).mean()
            loss = loss_dis + m["lambda_adv"] * generator_loss(self.disc(image, c, g))
        loss.backward()
        norms = [torch.linalg.vector_norm(p.grad) for p in self.trained]  # logged gradient norm
        torch.nn.utils.clip_grad_norm_(self.trained, m["grad_clip_g"], foreach=False)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        with torch.no_grad():
            for shadow, p in zip(self.ema, self.trained):
                shadow.lerp_(p.float(), 1 - m["ema_decay"])
        with torch.autocast(dev.type, torch.bfloat16, enabled=self.autocast):
            real = self.disc(hr, c, g)
            fake = self.disc(image.detach(), c, g)
            loss_d = discriminator_hinge_loss(real, fake)
        loss_d.backward()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        logs = {"loss_g": loss.item(), "loss_d": loss_d.item(), "grad_norm": torch.stack(norms).norm().item()}
        for s in range(len(self.student_t)):  # per-step losses, read on the host
            at_s = (start + 1) == s
            if at_s.any():
                logs[f"loss_dis_step{s + 1}"] = per_sample[at_s].mean().item()


def optimizer_arguments(node: dict) -> dict:
    return {k: v for k, v in node.items() if not k.startswith("_")}


def run_baseline(
    parts: dict, batch: int, crop: int, device, warmup: int, iters: int, count_flops: bool
) -> tuple[list[float], int | None]:
    """(timed iteration seconds, FLOP of one iteration or None: an extra first iteration, untimed)."""
    recipe = PlainRecipe(parts, device)
    generator = torch.Generator().manual_seed(0)
    flops = None
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            recipe.iteration(random_batch(batch, crop, device, generator))
        flops = counter.get_total_flops()
    times = []
    for i in range(warmup + iters):
        data = random_batch(batch, crop, device, generator)
        synchronize(device)
        start = time.perf_counter()
        recipe.iteration(data)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, flops


# ----------------------------------------------------------------------------------- report
def bf16_peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16 peak (`BF16_PEAK_TFLOPS`), None on the CPU or an unlisted card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in BF16_PEAK_TFLOPS if part in name), None)


def row(name: str, batch: int, times: list[float], device, flops: int | None) -> dict:
    """One row: time, throughput, peak memory, FLOP and the share of the card's bf16 peak they reach, and
    the hours the paper's PAPER_SAMPLES would take at this throughput."""
    ms = statistics.median(times) * 1000
    samples_per_s = batch / (ms / 1000)
    achieved = None if flops is None else flops / (ms / 1000) / 1e12
    peak = bf16_peak_tflops(device)
    return {
        "name": name,
        "batch": batch,
        "ms_per_iteration": ms,
        "samples_per_s": samples_per_s,
        "peak_gib": peak_gib(device),
        "tflop_per_iteration": None if flops is None else flops / 1e12,
        "achieved_tflops": achieved,
        "share_of_bf16_peak": None if achieved is None or peak is None else achieved / peak,
        "paper_hours": PAPER_SAMPLES / samples_per_s / 3600,
    }


def fixed_and_per_sample(rows: list[dict]) -> dict[str, dict]:
    """Per row name measured at two or more batches: the least-squares line ms = fixed + per_sample x batch
    (the part of an iteration that does not grow with the batch, and what each sample adds)."""
    fits = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        points = [
            (r["batch"], r["ms_per_iteration"]) for r in rows if r["name"] == name and r["ms_per_iteration"]
        ]
        if len({b for b, _ in points}) < 2:
            continue
        mean_b = statistics.fmean(b for b, _ in points)
        mean_ms = statistics.fmean(ms for _, ms in points)
        slope = sum((b - mean_b) * (ms - mean_ms) for b, ms in points) / sum(
            (b - mean_b) ** 2 for b, _ in points
        )
        fits[name] = {"fixed_ms": mean_ms - slope * mean_b, "per_sample_ms": slope}
    return fits


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=[p for p in PRESETS if p != "tiny"], default="seesr")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on the CPU (smoke run)")
    parser.add_argument(
        "--batch", default=None, help="batches of ours, comma-separated (default 2,4,8; tiny 2)"
    )
    parser.add_argument(
        "--baseline-batch",
        default="2",
        help="batches of the baseline, comma-separated (two give its fixed part)",
    )
    parser.add_argument("--memory-cap", type=float, default=20.0, help="GiB")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3; tiny 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10; tiny 2)")
    parser.add_argument(
        "--plan-auto",
        action="store_true",
        help="on CUDA: the row `ours plan=auto` (method.memory.plan=auto's probe and choice, then that run)",
    )
    parser.add_argument(
        "--plan-batch",
        type=int,
        default=None,
        help="effective batch of the plan=auto row (default 6, the paper's; tiny: the first --batch)",
    )
    parser.add_argument(
        "--plan-cap",
        type=float,
        default=None,
        help="memory_cap of the plan=auto row, GiB (default: the device)",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="ours without method.speed's compile and CUDA graphs (on by default on CUDA)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--no-flops", action="store_true", help="skip the FLOP count (one extra untimed iteration per row)"
    )
    parser.add_argument(
        "--plan-only", action="store_true", help="build ours, print the static memory plan, run nothing"
    )
    parser.add_argument(
        "--trainable",
        default=None,
        help="with --plan-only: method.trainable sets to plan side by side, comma-separated (controlnet,lora), "
        "each against the device memories of --capacities",
    )
    parser.add_argument(
        "--capacities",
        default=",".join(f"{c:g}" for c in PLAN_CAPACITIES_GIB),
        help="with --trainable: device memories in GiB, comma-separated",
    )
    parser.add_argument("--json", default=None, help="write the result as one JSON object to this file")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for ours (method.memory.*=...)")
    args = parser.parse_args()

    preset = "tiny" if args.tiny else args.preset
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    batches = [int(b) for b in (args.batch or ("2" if args.tiny else "2,4,8")).split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    iters = args.iters if args.iters is not None else (2 if args.tiny else 10)
    crop = CROP[preset]
    note = " (smoke run of the script, not a measurement)" if device.type == "cpu" else ""
    if args.plan_only:
        print_plan(preset, args, device)
        return
    print(f"preset {preset}, {crop}px HR crops, on {device}{note}", flush=True)
    count_flops = not args.no_flops
    rows = []
    if preset not in BASELINE_PRESETS and not args.no_baseline:
        print(f"no baseline for {preset}: PlainRecipe writes out SD2's UNet + ControlNet only")
    if preset in BASELINE_PRESETS and not args.no_baseline:
        for batch in [int(b) for b in args.baseline_batch.split(",")]:
            fresh_peak(device)
            times, flops = run_baseline(
                compose_preset(preset, []), batch, crop, device, warmup, iters, count_flops
            )
            rows.append(row("baseline", batch, times, device, flops))
            print_row(rows[-1])
        fresh_peak(device)

    eager = ["method.speed.compile=none", "method.speed.cuda_graph=false"] if args.eager else []
    parts = compose_preset(preset, [*eager, *args.overrides])
    module = AddSRModule(**parts)
    capacity = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    compile_s = None
    for batch in batches:
        fresh_peak(device)
        try:
            times, flops, untimed_s = run_ours(module, batch, crop, device, warmup, iters, count_flops)
            if module.speed.compile != "none" and compile_s is None:  # the warmup iterations hold it
                compile_s = untimed_s
        except RuntimeError as error:
            if not is_oom(error):
                raise
            rows.append(
                {
                    "name": "ours",
                    "batch": batch,
                    "ms_per_iteration": None,
                    "samples_per_s": None,
                    "peak_gib": None,
                    "oom": True,
                }
            )
            print(f"ours      batch {batch}: out of memory")
            break
        rows.append(row("ours", batch, times, device, flops))
        print_row(rows[-1])
    for r in rows:
        if r["name"] == "ours":
            r["lever_plan"] = configured_plan(parts, r["batch"]).as_dict()
    print(f"ours      levers: {configured_plan(parts, batches[0]).summary()} (configured)")
    plan = module_memory_plan(module, capacity)  # before the plan=auto row switches the levers
    plan_auto = None
    if device.type == "cuda" and args.plan_auto:
        plan_auto = run_plan_auto(module, parts, args, crop, device, warmup, iters, count_flops, capacity)
        rows.append(plan_auto)
        print_row(plan_auto)
    elif device.type == "cpu":
        # the plan applies on CUDA only: on the CPU it would run ours as configured, the row above
        choice = configured_plan(parts, args.plan_batch or batches[0], "cpu")
        plan_auto = {"name": "ours plan=auto", "ran": False, "lever_plan": choice.as_dict()}
        print(f"ours plan=auto: {NOT_PROBED['cpu'].format(choice.summary())}")
    print(plan.table())

    ours = [r for r in rows if r["name"] == "ours" and r["samples_per_s"] is not None]
    for r in ours:
        if r["peak_gib"] is not None:  # what the plan's headroom divides by to give the batch that fits
            per_sample = (r["peak_gib"] - plan.device_gib) / r["batch"]
            print(f"ours      batch {r['batch']}: peak above the static plan {per_sample:.2f} GiB per sample")
    fits = [r for r in ours if r["peak_gib"] is None or r["peak_gib"] <= args.memory_cap]
    best = max(fits, key=lambda r: r["samples_per_s"], default=None)
    baseline = max(
        (
            r
            for r in rows
            if r["name"] == "baseline" and (r["peak_gib"] is None or r["peak_gib"] <= args.memory_cap)
        ),
        key=lambda r: r["samples_per_s"],
        default=None,
    )
    ratio = best["samples_per_s"] / baseline["samples_per_s"] if best and baseline else None
    largest = max((r["batch"] for r in fits), default=None)
    cap_note = " (peak not measured on the CPU)" if device.type == "cpu" else ""
    print(f"largest batch under {args.memory_cap:g} GiB: {largest}{cap_note}")
    if ratio is not None:
        print(
            f"samples/s ratio, ours (batch {best['batch']}) / baseline (batch {baseline['batch']}): {ratio:.2f}x"
        )
    if compile_s is not None:
        print(f"compile time (warmup minus timed iterations): {compile_s:.1f} s")
    fits_by_name = fixed_and_per_sample(rows)
    for name, fit in fits_by_name.items():
        print(
            f"{name:<9} fixed {fit['fixed_ms']:.1f} ms per iteration + {fit['per_sample_ms']:.1f} ms per sample "
            "(least squares over its batches)"
        )
    result = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "rows": rows,
        "ratio_samples_per_s": ratio,
        "largest_batch_under_cap": largest,
        "memory_plan": plan.as_dict(),
        "fixed_and_per_sample": fits_by_name,
        "bf16_peak_tflops": bf16_peak_tflops(device),
        "paper_samples": PAPER_SAMPLES,
    }
    result["speed"] = dataclasses.asdict(module.speed)
    print("speed: " + ", ".join(f"{k}={v}" for k, v in result["speed"].items()))
    if compile_s is not None:
        result["compile_s"] = compile_s
    if plan_auto is not None:
        result["plan_auto"] = plan_auto
        if plan_auto.get("samples_per_s") and baseline:
            result["ratio_plan_auto_samples_per_s"] = plan_auto["samples_per_s"] / baseline["samples_per_s"]
            print(
                f"samples/s ratio, ours plan=auto / baseline: {result['ratio_plan_auto_samples_per_s']:.2f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def configured_plan(parts: dict, batch: int, mode: str = "manual"):
    """The levers ours runs with as configured (each `auto` lever at its manual value), at `batch` x 1."""
    return manual_choice(parts["method"]["memory"], batch, 1, mode)


def run_plan_auto(
    module, parts: dict, args, crop: int, device, warmup: int, iters: int, count_flops: bool, capacity
):
    """The row `ours plan=auto`: the plan's probe and choice on this card at the effective batch
    `--plan-batch` under `--plan-cap` (default: the card's memory), then ours with that choice."""
    memory = parts["method"]["memory"]  # as composed: `auto` where the plan decides, your overrides kept
    effective = args.plan_batch or 6
    cap = args.plan_cap or capacity
    module.method["accumulate_grad_batches"] = 1
    fresh_peak(device)
    start = time.perf_counter()
    choice = probe_and_choose(module, memory, effective, cap, crop, 4, "bf16-mixed")
    probe_s = time.perf_counter() - start
    print(choice.table())
    print(f"plan=auto probe: {probe_s:.1f} s")
    set_levers(module, choice.levers)
    fresh_peak(device)
    times, flops, _ = run_ours(
        module, choice.micro_batch, crop, device, warmup, iters, count_flops, choice.accumulate
    )
    result = row("ours plan=auto", effective, times, device, flops)
    return result | {"lever_plan": choice.as_dict(), "probe_s": probe_s}


def print_plan(preset: str, args, device: torch.device) -> None:
    """The start-up memory plan of ours as bf16-mixed training prints it; built on the meta device
    (no weights are allocated), so any preset plans in seconds on any machine. With `--trainable`, one
    plan per trainable set and the static part of each against `--capacities`."""
    capacity = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    if args.trainable is None:
        plan = meta_plan(preset, args.overrides, capacity)
        print(plan.table())
        result = {"preset": preset, "memory_plan": plan.as_dict()}
    else:
        plans = {
            name: meta_plan(preset, [*args.overrides, f"method.trainable={name}"], capacity)
            for name in args.trainable.split(",")
        }
        for name, plan in plans.items():
            print(f"method.trainable={name}\n{plan.table()}\n")
        capacities = [float(c) for c in args.capacities.split(",")]
        print(static_fit_table(preset, plans, capacities))
        result = {
            "preset": preset,
            "memory_plans": {name: plan.as_dict() for name, plan in plans.items()},
            "static_fits": static_fits(plans, capacities),
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def meta_plan(preset: str, overrides: list[str], capacity: float | None):
    with torch.device("meta"):
        module = AddSRModule(**compose_preset(preset, overrides))
    module.cast_frozen(torch.bfloat16)
    return module_memory_plan(module, capacity)


def static_fits(plans: dict, capacities: list[float]) -> dict[str, dict]:
    """Per trainable set: its static GiB and, per device memory, what is left for activations (negative:
    the static part alone does not fit)."""
    return {
        name: {
            "static_gib": plan.device_gib,
            "host_gib": plan.host_gib,
            "trained_m": plan.components[0].trainable_m,
            "left_for_activations_gib": {f"{c:g}": c - plan.device_gib for c in capacities},
        }
        for name, plan in plans.items()
    }


def static_fit_table(preset: str, plans: dict, capacities: list[float]) -> str:
    head = f"{'trainable':<12}{'trained M':>10}{'static GiB':>12}" + "".join(
        f"{f'{c:g} GiB':>14}" for c in capacities
    )
    lines = [
        f"{preset}: static memory (weights, gradients, optimiser state, EMA; bf16 frozen parts) and what "
        "it leaves of each device for activations. Static part only: activations are not included and "
        "not measured here.",
        head,
    ]
    for name, fit in static_fits(plans, capacities).items():
        cells = "".join(
            f"{(f'{left:.1f} left' if left > 0 else 'no'):>14}"
            for left in fit["left_for_activations_gib"].values()
        )
        lines.append(f"{name:<12}{fit['trained_m']:>10.1f}{fit['static_gib']:>12.2f}{cells}")
    return "\n".join(lines)


def print_row(r: dict) -> None:
    peak = "n/a (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    flops = "FLOP not counted"
    if r["tflop_per_iteration"] is not None:
        share = "n/a" if r["share_of_bf16_peak"] is None else f"{100 * r['share_of_bf16_peak']:.1f} %"
        flops = (
            f"{r['tflop_per_iteration']:.4g} TFLOP/iteration, {r['achieved_tflops']:.4g} TFLOP/s achieved, "
            f"{share} of the card's bf16 peak"
        )
    print(
        f"{r['name']:<9} batch {r['batch']}: {r['ms_per_iteration']:.1f} ms/iteration, "
        f"{r['samples_per_s']:.2f} samples/s, peak {peak} GiB, {flops}, "
        f"{r['paper_hours']:.1f} h for the paper's {PAPER_SAMPLES:,} samples",
        flush=True,
    )


if __name__ == "__main__":
    main()
