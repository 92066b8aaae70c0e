"""Few-step SR latency and peak memory: our pipeline, as `addsr-pl upscale` runs it, against plain eager loops.

Random weights of SD2-base's architecture (`--models sd2`: UNet + ControlNet + VAE) and of SeeSR's
(`seesr`: the same plus image cross-attention and a Swin-L RAM), of SD3.5-medium's and SDXL-base's
(`sd35_medium`, `sdxl`: our rows only, built through the backbone); speed does not depend on weight
values. LR `--lr-size`² -> SR 4x, 1 and 4 student steps with PSR. Rows, run in this order whatever `--rows`
lists, each pipeline built, measured and freed alone (its peak includes its own weights only):

- `eager fp16` / `eager bf16`: the official pipeline's work, module by module, in plain diffusers calls
  (for SeeSR: RAM once for the tags and once per step for the representation, as the official code does).
- `ours eager`: `AddSRPipeline.with_speed` with compile none and no CUDA graph.
- `ours graph`: the whole sampler as one CUDA graph per (timesteps, size, batch), replayed.
- `ours graph + tiny PSR decoder`: the graph row with a small AutoencoderTiny for PSR's intermediate decodes.
- `ours compiled`: `--compile-mode` (per module) under the whole-sampler CUDA graph (reduce-overhead:
  torch's graphs). Last: its compile is the longest part (mode `default`: 135 s at SD2 size on an H200).

Also: the first call's seconds (compile / capture time), a per-part breakdown of ours eager (one
denoiser step, VAE decode, VAE encode, one tagger pass, one small-decoder pass), FLOPs of a 4-step
call with the VAE and with the small decoder (`torch.utils.flop_counter`), and with `--tiled-lr` the
peak memory of a tiled upscale (LR side -> 4x, `conf/upscale.yaml`'s tiling), and the images/s of a folder
of same-size images at batch `--folder-batch` (8) against the sampler's own at that batch. `--json` is rewritten
after every row and part, with `"complete": false` until the end, so a run stopped by a time limit keeps
what it finished.

    python bench/inference.py --json out.json                      # CUDA, both models, every row
    python bench/inference.py --tiny                               # CPU smoke run (tiny presets)
    python bench/inference.py --flops-only --models sd2            # FLOPs on the meta device, any machine
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from addsr_pl.core.sampler import upscale
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.speed import SpeedSettings, exported_defaults
from addsr_pl.inference.upscaler import Upscaler
from addsr_pl.models.backbones import backbone, component_parts
from addsr_pl.models.conditioning import Conditioner
from addsr_pl.models.psr_decoder import PsrDecoder, build_tiny_autoencoder
from addsr_pl.models.vae import VaeCodec
from addsr_pl.paths import config_dir
from addsr_pl.upscale import defaults

# model name -> (model preset, conditioning preset); the tiny ones are the CPU smoke run's.
MODELS = {
    "sd2": ("sd2_random", "fixed"),
    "seesr": ("sd2_seesr_random", "ram"),
    # the public SD3.5-medium and SDXL-base architectures (docs/backbones.md "Memory at real size"); RAM's tags
    "sd35_medium": ("sd35_medium_random", "ram"),
    "sdxl": ("sdxl_random", "ram"),
    "flux_dev": ("flux_dev_random", "ram"),
    "tiny": ("tiny", "fixed"),
    "tiny_seesr": ("tiny_seesr", "tiny_ram"),
    "sd3_tiny": ("sd3_tiny", "fixed"),
    "sdxl_tiny": ("sdxl_tiny", "fixed"),
    "flux_tiny": ("flux_tiny", "fixed"),
}
# The eager baselines write out SD2's UNet + ControlNet loop: other backbones get our rows only.
BASELINE_BACKBONES = ("sd2",)
# Run order: the baselines first (each ratio needs eager fp16), the compiled row last (the longest).
ROWS = ("eager_fp16", "eager_bf16", "ours_eager", "ours_graph", "ours_graph_tiny_psr", "ours_compiled")
# The small decoder's shape in these rows: TAESD's (conf/method/psr_decoder.yaml's architecture).
PSR_DECODER_METHOD = "psr_decoder.yaml"


def compose_model(name: str, cache_dir: str):
    """(components, conditioning dict, student timesteps, inference PSR weight) with random weights."""
    model, conditioning = MODELS[name]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={model}",
                f"conditioning={conditioning}",
                f"paths.cache_dir={cache_dir}",
                f"paths.weights_dir={cache_dir}/no_weights",  # random weights: no folder is read
            ],
        )
    parts = instantiate(OmegaConf.to_container(cfg.model.components, resolve=True), _convert_="all")
    cond = OmegaConf.to_container(cfg.conditioning, resolve=True)
    tagger = cond.get("tagger")
    if tagger and tagger["_target_"].endswith("from_folder"):
        # RAM's architecture with random weights and placeholder tags: no checkpoint is read.
        classes = tagger["architecture"]["num_classes"]
        keep = (
            "architecture",
            "interpolation",
            "antialias",
            "image_mean",
            "image_std",
            "tag_separator",
            "dtype",
        )
        cond["tagger"] = {
            "_target_": "addsr_pl.models.ram.RAMTagger.random",
            "tag_list": [f"tag{i}" for i in range(classes)],
            "class_thresholds": [1.0] * classes,  # sigmoid never exceeds 1: no tags, a fixed-length prompt
            **{k: tagger[k] for k in keep},
        }
    return parts, cond, list(cfg.method.student_timesteps), float(cfg.method.inference_psr_weight)


def conditioning_scale() -> float:
    """The ControlNet residuals' scale of conf/method/addsr.yaml, as training and the exported student use."""
    return float(OmegaConf.load(config_dir() / "method" / "addsr.yaml").conditioning_scale)


def small_decoder(codec: VaeCodec) -> PsrDecoder:
    architecture = OmegaConf.load(config_dir() / "method" / PSR_DECODER_METHOD).architecture
    return PsrDecoder(
        build_tiny_autoencoder(
            codec.scale_factor,
            codec.vae.config.latent_channels,
            architecture.channels,
            architecture.blocks_per_stage,
        )
    ).eval()


def ours(parts, cond, timesteps, psr_weight, speed: SpeedSettings, device, tiny_psr: bool) -> AddSRPipeline:
    """The pipeline through the components' backbone; `timesteps` are DDPM's (the config's), mapped by the
    backbone's schedule (equal-SNR sigmas under rectified flow)."""
    family = backbone(parts.backbone)
    named = component_parts(parts)
    codec = VaeCodec(parts.vae).eval()
    schedule = family.noise_schedule(named, "student")
    pipeline = AddSRPipeline(
        family.denoiser({n: named[n] for n in family.networks}, codec, conditioning_scale()).eval(),
        codec,
        family.conditioner(named, cond).eval(),
        schedule,
        schedule.from_ddpm(torch.tensor(timesteps)).tolist(),
        psr=True,
        psr_weight=psr_weight,
        scale=4,
        psr_decoder=small_decoder(codec) if tiny_psr else None,
    )
    return pipeline.with_speed(speed, device)


class Baseline:
    """The official pipeline's work in plain eager diffusers calls, in one dtype."""

    def __init__(self, parts, cond, timesteps, psr_weight, device, dtype):
        self.parts, self.timesteps, self.psr_weight = parts, timesteps, psr_weight
        for module in (parts.unet, parts.controlnet, parts.vae, parts.text_encoder):
            module.to(device, dtype).eval()
        self.conditioner = Conditioner.from_config(parts.text_encoder, parts.tokenizer, parts.unet, cond)
        self.conditioner.to(device, dtype).eval()
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
        vae, unet, controlnet, sched = (
            self.parts.vae,
            self.parts.unet,
            self.parts.controlnet,
            self.parts.scheduler,
        )
        sf = vae.config.scaling_factor
        lr_up = upscale(lr.float(), (lr.shape[-2] * 4, lr.shape[-1] * 4))
        embeds = self.conditioner.text_embeds(lr_up).to(self.dtype)  # tags: one tagger pass
        latent = vae.encode(lr_up.to(self.dtype) * 2 - 1).latent_dist.mean * sf
        ts = self.timesteps[:steps]
        alphas = sched.alphas_cumprod.to(self.device)
        noise = torch.randn(latent.shape, generator=generator, device=self.device).to(self.dtype)
        z = sched.add_noise(latent, noise, torch.tensor([ts[0]], device=self.device))
        control = lr_up
        image = None
        for i, t in enumerate(ts):
            tt = torch.tensor([t], device=self.device)
            extra = {}
            representation = self.conditioner.represent(control)  # another tagger pass per step
            if representation is not None:
                extra["image_encoder_hidden_states"] = representation.to(self.dtype)
            down, mid = controlnet(
                z,
                tt,
                encoder_hidden_states=embeds,
                controlnet_cond=control.to(self.dtype),
                return_dict=False,
                **extra,
            )
            eps = unet(
                z, tt, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False, **extra,
            )[0]  # fmt: skip
            ab = alphas[t]
            x0 = (z - (1 - ab).sqrt() * eps) / ab.sqrt()
            image = ((vae.decode(x0 / sf).sample.float() + 1) / 2).clamp(0, 1)
            if i + 1 < len(ts):
                control = self.psr_weight * image + (1 - self.psr_weight) * lr_up
                noise = torch.randn(x0.shape, generator=generator, device=self.device).to(self.dtype)
                z = sched.add_noise(x0, noise, torch.tensor([ts[i + 1]], device=self.device))
        return image


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> dict:
    """First call's seconds (compile / capture included), then median and best ms of `iters` calls after
    `warmup` more, and the peak memory since the last reset."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "best_ms": min(times), "first_call_s": first,
            "peak_gib": peak_gib(device)}  # fmt: skip


def time_part(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.no_grad()
def breakdown(pipeline: AddSRPipeline, lr: torch.Tensor, device: torch.device, iters: int) -> dict:
    """Median ms of each part of ours eager: one denoiser step, VAE decode/encode, tagger, small decoder."""
    lr_up, text, representation, timesteps, _, noises = pipeline._inputs(lr, 4, None, None)
    dtype = next(pipeline.denoiser.parameters()).dtype
    from addsr_pl.models.conditioning import Conditioning

    latent = pipeline.codec.encode(lr_up)
    conditioning = Conditioning(text.to(dtype), representation)
    t = timesteps[:1].expand(lr.shape[0])
    parts = {
        "denoiser_step_ms": lambda: pipeline.denoiser(latent.to(dtype), t, lr_up, conditioning),
        "vae_decode_ms": lambda: pipeline.codec.decode(latent),
        "vae_encode_ms": lambda: pipeline.codec.encode(lr_up),
    }
    if pipeline.conditioner.tagger is not None:
        parts["tagger_ms"] = lambda: pipeline.conditioner.tagger(lr_up)
    if pipeline.psr_decoder is not None:
        parts["small_decoder_ms"] = lambda: pipeline.psr_decoder.decode(latent)
    return {name: time_part(fn, device, iters) for name, fn in parts.items()}


@torch.no_grad()
def flops(pipeline: AddSRPipeline, lr: torch.Tensor) -> dict:
    """TFLOP of a 4-step PSR call with the VAE, and with the small decoder where the pipeline has one."""
    result = {}
    for decoder in ("vae", "tiny") if pipeline.psr_decoder is not None else ("vae",):
        with FlopCounterMode(display=False) as counter:
            pipeline.run(lr, steps=4, psr_decoder=decoder)
        result[f"psr_{decoder}_4step_tflop"] = counter.get_total_flops() / 1e12
    if "psr_tiny_4step_tflop" in result:
        result["tiny_cut"] = 1 - result["psr_tiny_4step_tflop"] / result["psr_vae_4step_tflop"]
    return result


def speed_for(row: str, device: torch.device, compile_mode: str) -> SpeedSettings:
    base = {**exported_defaults(), "precision": "auto", "compile": "none", "cuda_graph": False}
    if row in ("ours_graph", "ours_graph_tiny_psr"):
        base["cuda_graph"] = True
    if row == "ours_compiled":
        base |= {"compile": compile_mode, "compile_scope": "modules", "cuda_graph": True}
    return SpeedSettings.from_dict(base)


def bench_model(name: str, args, device: torch.device, result: dict, save: Callable[[], None]) -> None:
    """Every requested row at 1 and 4 steps, each pipeline alone; then breakdown, FLOPs and tiling.
    Fills `result` in place and calls `save` after each row and part."""
    lr = torch.rand(1, 3, args.lr_size, args.lr_size, generator=torch.Generator().manual_seed(0)).to(device)
    result |= {"rows": [], "ratios": {}}
    # Built once on the CPU (random initialisation of SD2-sized models takes seconds); each row gets a copy.
    source, cond, timesteps, psr_weight = compose_model(name, args.cache_dir)
    rows = args.rows
    if source.backbone not in BASELINE_BACKBONES:
        rows = [r for r in rows if not r.startswith("eager_")]
        print(f"{name}: no eager baseline rows (they write out SD2's UNet + ControlNet loop)")
    for row in rows:
        free(device)
        parts = copy.deepcopy(source)
        if row.startswith("eager_"):
            dtype = {"eager_fp16": torch.float16, "eager_bf16": torch.bfloat16}[row]
            if device.type == "cpu":
                dtype = torch.float32
            runner = Baseline(parts, cond, timesteps, psr_weight, device, dtype)
        else:
            speed = speed_for(row, device, args.compile_mode)
            runner = ours(
                parts, cond, timesteps, psr_weight, speed, device, tiny_psr=row == "ours_graph_tiny_psr"
            )
        del parts
        for steps in args.steps:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            generator = torch.Generator(device=device).manual_seed(0)
            stats = measure(
                lambda r=runner, s=steps, g=generator: r(lr, steps=s, generator=g),
                device,
                args.warmup,
                args.iters,
            )
            result["rows"].append({"row": row, "steps": steps, **stats})
            result["ratios"] = ratios(result["rows"])
            save()
            print(f"{name:10s} {row:22s} {steps:5d} {stats['median_ms']:10.1f} {stats['best_ms']:9.1f} "
                  f"{stats['first_call_s']:8.1f} {_gib(stats['peak_gib'])}", flush=True)  # fmt: skip
        del runner
    free(device)
    parts = source
    eager = ours(
        parts, cond, timesteps, psr_weight, speed_for("ours_eager", device, "none"), device, tiny_psr=True
    )
    result["breakdown"] = breakdown(eager, lr, device, args.iters)
    save()
    print(
        f"{name} breakdown (ours eager, ms): {json.dumps({k: round(v, 2) for k, v in result['breakdown'].items()})}"
    )
    if args.flops:
        result["flops"] = flops(eager, lr)
        save()
        print(f"{name} FLOPs: {json.dumps({k: round(v, 3) for k, v in result['flops'].items()})}")
    if args.tiled_lr:
        result["tiled"] = tiled_peak(eager, args, device)
        save()
        print(f"{name} tiled: {json.dumps(result['tiled'])}")
    if args.folder_batch:
        pipeline = eager.with_speed(speed_for("ours_graph", device, "none"), device)
        result["throughput"] = throughput(pipeline, args, device)
        save()
        print(f"{name} throughput: {json.dumps(result['throughput'])}")
    del eager, parts, source
    free(device)


def tiled_peak(pipeline: AddSRPipeline, args, device: torch.device) -> dict:
    """Peak memory and seconds of one tiled upscale of a random --tiled-lr² LR (conf/upscale.yaml tiling)."""
    settings = defaults()
    settings |= {"steps": args.tiled_steps, "color_fix": "none"}
    if args.tiled_tile is not None:
        vae_tile = args.tiled_tile * pipeline.codec.scale_factor
        settings["tiling"] |= {"latent_tile_size": args.tiled_tile, "latent_overlap": args.tiled_tile // 4,
                               "vae_tile_size": vae_tile, "vae_overlap": vae_tile // 4, "vae_padding": vae_tile // 4}  # fmt: skip
    lr = torch.rand(1, 3, args.tiled_lr, args.tiled_lr, generator=torch.Generator().manual_seed(1))
    free(device)
    synchronize(device)
    start = time.perf_counter()
    sr = Upscaler(pipeline, settings).upscale_tensor(lr.to(device))
    synchronize(device)
    return {"lr": args.tiled_lr, "sr": int(sr.shape[-1]), "steps": args.tiled_steps,
            "seconds": time.perf_counter() - start, "peak_gib": peak_gib(device)}  # fmt: skip


def throughput(pipeline: AddSRPipeline, args, device: torch.device) -> dict:
    """Images/s of `--folder-images` same-size LR files upscaled as `addsr-pl upscale` does it
    (`Upscaler.run`: background reading and writing, `--folder-batch` images per sampler call, ours
    graph with the small PSR decoder), against the sampler alone on batches of the same size (what the folder run would reach if
    reading, colour fix and writing cost nothing). The first batch (capture or compile) is run before
    either is timed."""
    import tempfile

    import numpy as np
    from PIL import Image

    batch, count, steps = args.folder_batch, args.folder_images, args.steps[-1]
    settings = defaults()
    settings |= {"steps": steps, "batch_size": batch}
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sources = []
        for i in range(count):
            pixels = rng.integers(0, 255, (args.lr_size, args.lr_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            sources.append(folder / f"{i}.png")
        upscaler = Upscaler(pipeline, settings)
        warm = [(s, folder / "out" / f"warm_{s.name}") for s in sources[:batch]]
        upscaler.run(warm, progress=False)
        synchronize(device)
        start = time.perf_counter()
        report = upscaler.run([(s, folder / "out" / s.name) for s in sources], progress=False)
        synchronize(device)
        folder_s = time.perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"throughput: the folder run failed: {report.failed}")
    lr = torch.rand(batch, 3, args.lr_size, args.lr_size, generator=torch.Generator().manual_seed(3)).to(
        device
    )
    generators = [torch.Generator(device=device).manual_seed(0) for _ in range(batch)]
    sampler = measure(
        lambda: pipeline(lr, steps=steps, generator=generators), device, args.warmup, args.iters
    )
    sampler_ips = batch / (sampler["median_ms"] / 1000)
    folder_ips = count / folder_s
    return {"row": "ours_graph_tiny_psr", "batch": batch, "images": count, "steps": steps, "folder_images_per_s": folder_ips,
            "sampler_images_per_s": sampler_ips, "folder_over_sampler": folder_ips / sampler_ips}  # fmt: skip


def ratios(rows: list[dict]) -> dict:
    """Each row's median over eager fp16's at the same step count (the targets are such ratios)."""
    base = {r["steps"]: r["median_ms"] for r in rows if r["row"] == "eager_fp16"}
    return {
        f"{r['row']}_{r['steps']}step": r["median_ms"] / base[r["steps"]] for r in rows if r["steps"] in base
    }


def _gib(value: float | None) -> str:
    return f"{value:9.2f}" if value is not None else f"{'n/a':>9s}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tiny", action="store_true", help="tiny presets on the CPU (a smoke run, not a measurement)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--models", default=None, help="comma list of " + ", ".join(MODELS))
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    p.add_argument("--steps", default="1,4")
    p.add_argument("--lr-size", type=int, default=None, help="LR side (default 128; 8 with --tiny)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--compile-mode", default="max-autotune-no-cudagraphs", help="the ours_compiled row's mode"
    )
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--flops-only", action="store_true", help="only FLOPs, counted on the meta device")
    p.add_argument(
        "--tiled-lr", type=int, default=None, help="also a tiled upscale of this LR side (e.g. 2048)"
    )
    p.add_argument("--tiled-steps", type=int, default=1)
    p.add_argument("--tiled-tile", type=int, default=None, help="latent tile side for the tiled run")
    p.add_argument(
        "--folder-batch", type=int, default=8,
        help="images/s of a folder of same-size images at this batch (0: skip)",
    )  # fmt: skip
    p.add_argument("--folder-images", type=int, default=None, help="files of that run (default 4 batches)")
    p.add_argument("--cache-dir", default="/tmp/addsr_pl_bench")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    args.device = torch.device(
        args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    )
    args.models = (args.models or ("tiny,tiny_seesr" if args.tiny else "sd2,seesr")).split(",")
    args.rows = args.rows.split(",")
    args.steps = [int(s) for s in args.steps.split(",")]
    args.lr_size = args.lr_size or (8 if args.tiny else 128)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 3)
    args.iters = args.iters if args.iters is not None else (1 if args.tiny else 10)
    args.folder_images = args.folder_images or 4 * args.folder_batch
    unknown = [m for m in args.models if m not in MODELS] + [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown models/rows {unknown}: models are {list(MODELS)}, rows {list(ROWS)}")
    args.rows = [r for r in ROWS if r in args.rows]
    return args


def flops_only(args) -> dict:
    """FLOPs of 1- and 4-step calls on the meta device (shapes only: any machine, seconds per model).
    Tags need values, so the prompt is the fixed one here: RAM's tagging head (small next to its Swin
    encoder, which the representation still runs) is left out."""
    results = {}
    for name in args.models:
        parts, cond, timesteps, psr_weight = compose_model(name, args.cache_dir)
        cond = {**cond, "prompt": "fixed"}
        speed = speed_for("ours_eager", torch.device("cpu"), "none")
        pipeline = ours(parts, cond, timesteps, psr_weight, speed, torch.device("cpu"), tiny_psr=True).to(
            "meta"
        )
        lr = torch.rand(1, 3, args.lr_size, args.lr_size, device="meta")
        results[name] = flops(pipeline, lr)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pipeline.run(lr, steps=1)
        results[name]["1step_tflop"] = counter.get_total_flops() / 1e12
        print(f"{name}: {json.dumps({k: round(v, 3) for k, v in results[name].items()})}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.flops_only:
        results = {"lr_size": args.lr_size, "flops": flops_only(args)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return results
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), LR {args.lr_size}² -> SR {4 * args.lr_size}², warmup {args.warmup}, "
          f"iters {args.iters}, torch {torch.__version__}")  # fmt: skip
    print(
        f"{'model':10s} {'row':22s} {'steps':>5s} {'median ms':>10s} {'best ms':>9s} {'first s':>8s} {'peak GiB':>9s}"
    )
    results = {"device": name, "lr_size": args.lr_size, "torch": torch.__version__, "complete": False,
               "models": {}}  # fmt: skip

    def save() -> None:  # written whole and then renamed: a kill mid-write leaves the previous file
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            partial = args.json.with_suffix(".partial")
            partial.write_text(json.dumps(results, indent=2))
            partial.replace(args.json)

    for model in args.models:
        bench_model(model, args, device, results["models"].setdefault(model, {}), save)
    results["complete"] = True
    save()
    return results


if __name__ == "__main__":
    main()
