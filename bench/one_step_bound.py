"""How good can a tiny 1-step model get? The supervised upper bound behind the demo's PSNR targets.

A 1-step AddSR student predicts the HR latent from (z_999, the upscaled LR) in one UNet + ControlNet
call. Distillation gives it the teacher's prediction as target; here it gets the true HR latent instead,
which no distilled student can beat. Everything else is the tiny preset's: its UNet and ControlNet
layout (`conf/model/tiny.yaml`, widths from `--widths`), SD2-base's noise schedule, the demo's
training and held-out pages (`conf/data/documents.yaml`, `conf/demo.yaml`), or with `--data sample` the
bundled photos and the held-out crops of `conf/eval.yaml`. The codec is lossless
(pixel-unshuffle by `--factor`, scaled to unit variance as SD's VAE latents are), so the VAE's own
ceiling does not enter. Two parameterisations of the UNet's output:

- `epsilon` (SD2-base, the method's Eq. 4): x0 = (z_t - sqrt(1 - a) eps) / sqrt(a), which at t = 999
  multiplies the prediction's error by sqrt(1 - a) / sqrt(a) ~ 14.7;
- `v` (SD2-768's): x0 = sqrt(a) z_t - sqrt(1 - a) v, which does not.

It prints the held-out PSNR of the 1-step prediction against bicubic's as training goes, on the CPU:

    python bench/one_step_bound.py --prediction epsilon --minutes 5 --json eps.json
    python bench/one_step_bound.py --prediction v --minutes 10 --json v.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from hydra.utils import instantiate
from omegaconf import OmegaConf

from addsr_pl.core.noise_schedule import DDPMSchedule
from addsr_pl.core.sampler import upscale
from addsr_pl.data.degradation import BicubicDegradation
from addsr_pl.paths import config_dir

T_START = 999  # the 1-step student's timestep (method.student_timesteps[0])


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(-10 * torch.log10((x - y).pow(2).mean()))


def build(factor: int, widths: list[int], crop: int):
    tiny = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny.yaml").components)
    channels = 3 * factor**2
    unet = UNet2DConditionModel(**{**tiny["unet"], "sample_size": crop // factor, "in_channels": channels,
                                   "out_channels": channels, "block_out_channels": widths})  # fmt: skip
    width = tiny["controlnet"]["conditioning_embedding_out_channels"][-1]
    embedding = [width] * (int(math.log2(factor)) + 1)  # one stride-2 convolution per halving
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(conv.weight, std=tiny["zero_conv_std"])
    return (
        unet,
        controlnet,
        DDPMScheduler(**tiny["scheduler"]).alphas_cumprod,
        tiny["unet"]["cross_attention_dim"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prediction", choices=["epsilon", "v"], default="epsilon")
    parser.add_argument("--factor", type=int, default=8, help="pixel-unshuffle factor of the lossless codec")
    parser.add_argument("--widths", default="96,128", help="the UNet's block_out_channels")
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="training time (cosine learning rate over it)"
    )
    parser.add_argument("--crop", type=int, default=64, help="HR training crop")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250, help="iterations between held-out scores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=["documents", "sample"], default="documents",
                        help="documents: the demo's rendered pages and held-out pages (conf/demo.yaml); sample: "
                        "the bundled photos and the held-out crops of conf/eval.yaml (chelsea, rocket, coffee)")  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    unet, controlnet, alphas_cumprod, context_dim = build(
        args.factor, [int(w) for w in args.widths.split(",")], args.crop
    )
    schedule = DDPMSchedule(alphas_cumprod, "epsilon" if args.prediction == "epsilon" else "v_prediction")
    params = [*unet.parameters(), *controlnet.parameters()]
    data = OmegaConf.load(config_dir() / "data" / f"{args.data}.yaml")
    train_cfg = OmegaConf.to_container(data.train)  # its ${..} keys are given here
    train_cfg.update(crop_size=args.crop, flip=True, repeats=10_000, seed=args.seed)
    train = instantiate(train_cfg)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    if args.data == "documents":
        held_out = instantiate(OmegaConf.load(config_dir() / "demo.yaml").evaluation.dataset)
    else:
        held_out = instantiate(OmegaConf.load(config_dir() / "eval.yaml").datasets.sample, scale=data.scale)
    degrade = BicubicDegradation(data.scale)

    first = next(iter(loader))["hr"]
    scale = float(1 / F.pixel_unshuffle(first * 2 - 1, args.factor).std())  # unit-variance latents

    def encode(images):
        return F.pixel_unshuffle(images * 2 - 1, args.factor) * scale

    def decode(latents):
        return ((F.pixel_shuffle(latents / scale, args.factor) + 1) / 2).clamp(0, 1)

    def one_step(z_t, control):
        t = torch.full((z_t.shape[0],), T_START)
        context = torch.zeros(z_t.shape[0], 1, context_dim)
        down, mid = controlnet(
            z_t, t, encoder_hidden_states=context, controlnet_cond=control, return_dict=False
        )
        out = unet(z_t, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample  # fmt: skip
        return schedule.predict_x0(z_t, out, t)

    def score() -> tuple[float, float]:
        gen = torch.Generator().manual_seed(args.seed)
        ours, bicubic = [], []
        with torch.no_grad():
            for item in held_out:
                lr, hr = item["lr"][None], item["hr"][None]
                lr_up = upscale(lr, hr.shape[-2:])
                start = encode(lr_up)  # inference starts from the upscaled LR's latent
                z_t = schedule.add_noise(
                    start, torch.randn(start.shape, generator=gen), torch.tensor([T_START])
                )
                ours.append(psnr(decode(one_step(z_t, lr_up)), hr))
                bicubic.append(psnr(lr_up, hr))
        return sum(ours) / len(ours), sum(bicubic) / len(bicubic)

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    budget, start, iteration, curve = args.minutes * 60, time.perf_counter(), 0, []
    while time.perf_counter() - start < budget:
        for batch in loader:
            hr, lr = degrade(batch["hr"])
            z0 = encode(hr)
            z_t = schedule.add_noise(z0, torch.randn_like(z0), torch.full((z0.shape[0],), T_START))
            loss = F.mse_loss(one_step(z_t, upscale(lr, hr.shape[-2:])), z0)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            iteration += 1
            elapsed = time.perf_counter() - start
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
            if iteration % args.eval_every == 0 or elapsed >= budget:
                ours, bicubic = score()
                curve.append({"iteration": iteration, "seconds": round(elapsed, 1), "loss": float(loss),
                              "psnr_1step": ours, "psnr_bicubic": bicubic})  # fmt: skip
                print(f"iteration {iteration:6d}  {elapsed:6.0f} s  loss {float(loss):.4f}  "
                      f"1-step PSNR {ours:.2f} dB  bicubic {bicubic:.2f} dB", flush=True)  # fmt: skip
            if elapsed >= budget:
                break
    result = {"prediction": args.prediction, "factor": args.factor, "widths": args.widths, "data": args.data,
              "parameters_M": sum(p.numel() for p in params) / 1e6, "minutes": args.minutes,
              "best_psnr_1step": max(c["psnr_1step"] for c in curve), "psnr_bicubic": curve[-1]["psnr_bicubic"],
              "curve": curve}  # fmt: skip
    print(f"best 1-step PSNR {result['best_psnr_1step']:.2f} dB against bicubic {result['psnr_bicubic']:.2f} dB "
          f"({result['parameters_M']:.1f} M parameters, {iteration} iterations)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
