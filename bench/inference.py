"""Few-step SR latency and peak memory: our AddSRPipeline against a plain diffusers eager fp16 loop.

Both run the same random-weight SD2-base + ControlNet architecture (`model=sd2_random`; speed does not
depend on weight values) on a 128x128 LR -> 512x512 SR, 1 and 4 steps, with PSR; the baseline does
the same work the official pipeline does, module by module, without our levers. `--tiny` runs the tiny
preset on the CPU (a smoke run of the script, not a measurement).

    python bench/inference.py                # CUDA: ours (bf16, channels_last, SDPA[, --compile]) vs eager fp16
    python bench/inference.py --tiny         # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from addsr_pl.core.sampler import Denoiser, upscale
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.models.conditioning import Conditioner, PromptEncoder
from addsr_pl.models.vae import VaeCodec
from addsr_pl.paths import config_dir


def components(preset: str):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}", "paths.cache_dir=/tmp/addsr_pl_bench"])
    node = OmegaConf.to_container(cfg.model.components, resolve=True)
    conditioning = OmegaConf.to_container(cfg.conditioning, resolve=True)
    return (
        instantiate(node, _convert_="all"),
        conditioning,
        list(cfg.method.student_timesteps),
        cfg.method.inference_psr_weight,
    )


def ours(parts, conditioning, timesteps, psr_weight, device, dtype, compile_models: bool) -> AddSRPipeline:
    pipeline = AddSRPipeline(
        Denoiser(parts.unet, parts.controlnet).eval(),
        VaeCodec(parts.vae).eval(),
        Conditioner.from_config(parts.text_encoder, parts.tokenizer, parts.unet, conditioning).eval(),
        parts.scheduler.alphas_cumprod.clone().float(),
        timesteps,
        psr=True,
        psr_weight=psr_weight,
        scale=4,
    ).to(device, dtype)
    if device.type == "cuda":
        for module in (parts.unet, parts.controlnet, parts.vae):
            module.to(memory_format=torch.channels_last)
    if compile_models:
        for module in (parts.unet, parts.controlnet, parts.vae.decoder, parts.vae.encoder):
            module.compile(mode="max-autotune")
    return pipeline


@torch.no_grad()
def eager_loop(parts, lr, steps, timesteps, psr_weight, generator, prompt_embeds):
    """The official pipeline's work, module by module, in plain eager diffusers calls."""
    vae, unet, controlnet, sched = parts.vae, parts.unet, parts.controlnet, parts.scheduler
    sf = vae.config.scaling_factor
    lr_up = upscale(lr.float(), (lr.shape[-2] * 4, lr.shape[-1] * 4)).to(lr.dtype)
    latent = vae.encode(lr_up * 2 - 1).latent_dist.mean * sf
    ts = timesteps[:steps]
    alphas = sched.alphas_cumprod.to(lr.device)
    z = sched.add_noise(
        latent,
        torch.randn(latent.shape, generator=generator, device=lr.device, dtype=lr.dtype),
        torch.tensor([ts[0]], device=lr.device),
    )
    control = lr_up
    image = None
    for i, t in enumerate(ts):
        tt = torch.tensor([t], device=lr.device)
        down, mid = controlnet(
            z, tt, encoder_hidden_states=prompt_embeds, controlnet_cond=control, return_dict=False
        )
        eps = unet(
            z,
            tt,
            encoder_hidden_states=prompt_embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        ab = alphas[t]
        x0 = (z - (1 - ab).sqrt() * eps) / ab.sqrt()
        image = ((vae.decode(x0 / sf).sample + 1) / 2).clamp(0, 1)
        if i + 1 < len(ts):
            control = psr_weight * image + (1 - psr_weight) * lr_up
            noise = torch.randn(x0.shape, generator=generator, device=lr.device, dtype=lr.dtype)
            z = sched.add_noise(x0, noise, torch.tensor([ts[i + 1]], device=lr.device))
    return image


def measure(fn, device, warmup: int, iters: int) -> tuple[list[float], float | None]:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return times, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--lr-size", type=int, default=None, help="LR side (default 128; 16 with --tiny)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile our pipeline's models")
    args = p.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    size = args.lr_size or (16 if args.tiny else 128)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    iters = args.iters if args.iters is not None else (2 if args.tiny else 20)
    ours_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    base_dtype = torch.float32 if device.type == "cpu" else torch.float16
    preset = "tiny" if args.tiny else "sd2_random"
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"model={preset}, LR {size}x{size} -> SR {4 * size}x{4 * size}, warmup {warmup}, iters {iters}"
    )

    parts, conditioning, timesteps, psr_weight = components(preset)
    lr = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    pipeline = ours(parts, conditioning, timesteps, psr_weight, device, ours_dtype, args.compile)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for steps in (1, 4):
        times, peak = measure(
            lambda steps=steps: pipeline(lr, steps=steps, generator=generator), device, warmup, iters
        )
        rows.append(
            (
                f"ours ({str(ours_dtype).removeprefix('torch.')}{', compiled' if args.compile else ''})",
                steps,
                times,
                peak,
            )
        )

    baseline = components(preset)[0]
    for module in (baseline.unet, baseline.controlnet, baseline.vae, baseline.text_encoder):
        module.to(device, base_dtype).eval()
    prompt = PromptEncoder(
        baseline.text_encoder, baseline.tokenizer, "fixed", conditioning["positive_prompt"], ""
    )
    embeds = prompt.encode([prompt.compose()])
    lr_base = lr.to(base_dtype)
    for steps in (1, 4):
        times, peak = measure(
            lambda steps=steps: eager_loop(
                baseline, lr_base, steps, timesteps, psr_weight, generator, embeds
            ),
            device,
            warmup,
            iters,
        )
        rows.append((f"diffusers eager ({str(base_dtype).removeprefix('torch.')})", steps, times, peak))

    print(f"{'pipeline':32s} {'steps':>5s} {'median ms':>10s} {'best ms':>9s} {'peak GiB':>9s}")
    for name, steps, times, peak in rows:
        peak_text = f"{peak:9.2f}" if peak is not None else f"{'n/a':>9s}"
        print(f"{name:32s} {steps:5d} {statistics.median(times):10.1f} {min(times):9.1f} {peak_text}")


if __name__ == "__main__":
    main()
