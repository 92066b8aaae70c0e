"""`make demo`: prepare a tiny codec, train a tiny teacher, distil a tiny AddSR student, evaluate, report.

Everything runs on the CPU on rendered text pages (`conf/demo.yaml`, `conf/data/documents.yaml`), with
nothing to download; the report is written to `outputs/demo/report.html` and `report.md`.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf, open_dict
from torchvision.utils import make_grid, save_image

from addsr_pl.core.sampler import Denoiser
from addsr_pl.data.documents import page_glyphs, render_page
from addsr_pl.evaluate import evaluate
from addsr_pl.evaluation.readability import GlyphClassifier, GlyphSet, readability, train_glyph_classifier
from addsr_pl.inference.io import read_image, write_image
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.method.losses import ta_weights
from addsr_pl.models.vae import VaeCodec
from addsr_pl.paths import PROJECT_ROOT, config_dir
from addsr_pl.train import train

matplotlib.use("Agg")

HELD_OUT = "held_out"  # the evaluation's name for the held-out pairs (`evaluation.dataset`)


def compose_config(name: str, run_dir: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose(name, overrides=[f"hydra.run.dir='{run_dir}'", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def prepare_codec(settings, out: Path, seed: int, base: list[str]) -> Path:
    """The tiny preset's codec, saved as `out/vae/`; returns `out`.

    A VAE (`model.components.codec=vae`) is fitted as an autoencoder on training crops, since a random
    one cannot reconstruct; the lossless pixel-unshuffle codec has nothing to fit. Either gets a
    `shift_factor` and `scaling_factor` that bring training latents to zero mean and unit variance (as
    SD3's VAE does), so the noise schedule means what it should."""
    cfg = compose_config("train", out, base)
    components = instantiate(OmegaConf.to_container(cfg.model.components, resolve=True), _convert_="all")
    codec = components.vae
    data = instantiate(OmegaConf.to_container(cfg.data.train, resolve=True), crop_size=settings.crop_size)
    loader = torch.utils.data.DataLoader(data, batch_size=settings.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    if not VaeCodec(codec).lossless:
        codec.train()
        optimizer = torch.optim.Adam(codec.parameters(), lr=settings.lr)
        step = 0
        while step < settings.steps:
            for batch in loader:
                x = batch["hr"] * 2 - 1
                recon = codec.decode(codec.encode(x).latent_dist.mean).sample
                loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step >= settings.steps:
                    break
    codec.eval()
    with torch.no_grad():
        latents = torch.cat(
            [codec.encode(b["hr"] * 2 - 1).latent_dist.mean for _, b in zip(range(8), loader)]
        )
        # SD3's convention: shift to zero mean, scale to unit variance (`VaeCodec`)
        codec.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    codec.save_pretrained(out / "vae")
    return out


def codec_ceiling(codec: VaeCodec, held_out) -> float:
    """The codec's reconstruction PSNR on the held-out HR images: the ceiling of anything decoded by it
    (infinite for a lossless codec, exact up to the float rounding of the latent shift and scale)."""
    if codec.lossless:
        return float("inf")
    with torch.no_grad():
        hr = torch.stack([item["hr"] for item in held_out])
        mse = float((codec.decode(codec.encode(hr)).clamp(0, 1) - hr).pow(2).mean())
    return -10 * math.log10(mse)


def fresh_run(run: Path) -> Path:
    """A rerun into the same output folder trains each stage afresh: training refuses to start over a
    run's checkpoints, and the report must read only this run's logs and exports."""
    shutil.rmtree(run, ignore_errors=True)
    return run


def train_teacher(run: Path, base: list[str], vae_dir: Path, steps: int, overrides: list[str]) -> Path:
    """stage=teacher on the demo's data and model with the codec of `vae_dir`; returns the exported teacher."""
    train(compose_config("train", run, [*base, f"model.components.vae_path={vae_dir}", "stage=teacher",
                                        f"trainer.max_steps={steps}", *overrides]))  # fmt: skip
    return run / "teacher"


# What a committed teacher must share with the demo that uses it (`demo_teacher.json`).
TEACHER_RECIPE = ("seed", "data", "crop_size", "model_overrides")
TEACHER_MANIFEST = "demo_teacher.json"
LOG_ROWS = 1000  # rows of the committed teacher's training log kept


def resolve_from_top(path: str) -> Path:
    folder = Path(path).expanduser()
    return folder if folder.is_absolute() else PROJECT_ROOT / folder


def teacher_checkpoint(settings) -> Path | None:
    """The committed teacher of `teacher.checkpoint` (relative paths from the project's top), checked
    against this demo's recipe; None when the setting is null (the demo then trains its own)."""
    if not settings.teacher.checkpoint:
        return None
    folder = resolve_from_top(settings.teacher.checkpoint)
    manifest = folder / TEACHER_MANIFEST
    if not manifest.is_file():
        raise SystemExit(
            f"teacher.checkpoint = {settings.teacher.checkpoint}: no {TEACHER_MANIFEST} in {folder}. Make it with "
            "`make demo-teacher`, or train a teacher inside the demo with `python -m addsr_pl.demo teacher.checkpoint=null`."
        )  # fmt: skip
    made = json.loads(manifest.read_text())
    now = {**teacher_recipe(settings), **teacher_training(settings)}
    made = {**made["recipe"], "steps": made.get("steps"), "overrides": made.get("overrides")}
    differ = [key for key in now if made.get(key) != now[key]]
    if differ:
        raise SystemExit(
            f"The committed teacher in {folder} was made with other settings ({', '.join(differ)}: "
            f"{', '.join(f'{k}={made.get(k)!r}' for k in differ)}). Remake it with `make demo-teacher`, or "
            "train one inside the demo with teacher.checkpoint=null."
        )  # fmt: skip
    return folder


def teacher_training(settings) -> dict:
    """How `make demo-teacher` trains: its iterations and stage=teacher overrides, resolved."""
    teacher = OmegaConf.to_container(settings.teacher, resolve=True)
    return {"steps": teacher["checkpoint_steps"],
            "overrides": [*teacher["overrides"], *teacher["checkpoint_overrides"]]}  # fmt: skip


def teacher_recipe(settings) -> dict:
    """The settings of `TEACHER_RECIPE`, resolved."""
    resolved = OmegaConf.to_container(settings, resolve=True)
    return {key: resolved[key] for key in TEACHER_RECIPE}


def make_teacher(settings, out: Path, base: list[str]) -> Path:
    """`make demo-teacher`: train the demo's teacher for `teacher.checkpoint_steps` with stage=teacher and
    write it to `teacher.checkpoint` (UNet and ControlNet in fp16, which loads back as fp32; the codec's
    config; the training log; and `demo_teacher.json` with the recipe, the command and the time)."""
    start = time.perf_counter()
    target = resolve_from_top(settings.teacher.checkpoint)
    vae_dir = prepare_codec(settings.codec, out / "vae_fit", settings.seed, base)
    run = fresh_run(out / "teacher_checkpoint")
    trained = train_teacher(run, base, vae_dir, settings.teacher.checkpoint_steps,
                            [*settings.teacher.overrides, *settings.teacher.checkpoint_overrides])  # fmt: skip
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copytree(vae_dir / "vae", target / "vae")
    for part, cls in (("unet", UNet2DConditionModel), ("controlnet", ControlNetModel)):
        cls.from_pretrained(trained, subfolder=part).half().save_pretrained(target / part)
    rows = read_log(run)
    rows = rows[:: max(1, len(rows) // LOG_ROWS)]  # enough for the loss curve, small enough to commit
    with (target / "teacher_log.csv").open("w", newline="") as handle:
        keys = sorted({k for r in rows for k in r if r[k] not in ("", None)})
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (target / TEACHER_MANIFEST).write_text(json.dumps({
        "made_by": "make demo-teacher (python -m addsr_pl.demo make_teacher=true)",
        "recipe": teacher_recipe(settings), **teacher_training(settings),
        "minutes": round((time.perf_counter() - start) / 60, 1)}, indent=2))  # fmt: skip
    print(f"Demo teacher: {target}")
    return target


def eval_config(run_dir: Path, overrides: list[str], held_out) -> DictConfig:
    """`conf/eval.yaml` scoring the demo's held-out pairs (`evaluation.dataset`) instead of its default set."""
    cfg = compose_config("eval", run_dir, overrides)
    with open_dict(cfg):
        cfg.datasets = {HELD_OUT: held_out}
    return cfg


def teacher_pipelines(
    teacher_dir: Path, student_dir: Path, step_counts: list[int], renoise: str = "ddim"
) -> dict[int, AddSRPipeline]:
    """The trained teacher as an upscaler for each step count: the student's sampler over that many evenly
    spaced timesteps, with DDIM's deterministic re-noising (`renoise`; the student's fresh noise at each of
    many steps piles up the errors of an imperfect tiny teacher). The weights are read once and shared."""
    student = AddSRPipeline.from_folder(student_dir)
    cls_unet, cls_cn = type(student.denoiser.unet), type(student.denoiser.controlnet)
    denoiser = Denoiser(cls_unet.from_pretrained(teacher_dir, subfolder="unet"),
                        cls_cn.from_pretrained(teacher_dir, subfolder="controlnet")).eval()  # fmt: skip
    return {
        steps: AddSRPipeline(
            denoiser,
            student.codec,
            student.conditioner,
            student.noise_schedule,
            torch.linspace(999, 0, steps + 1)[:-1].round().long().tolist(),
            psr=False,
            psr_weight=0.0,
            scale=student.scale,
            renoise=renoise,
        )  # fmt: skip
        for steps in step_counts
    }


def render(pipeline: AddSRPipeline, held_out, folder: Path, seed: int) -> float:
    """Upscale the held-out pairs into `folder/<HELD_OUT>/`; returns the mean milliseconds per image
    (the first image excluded as warm-up when there are several)."""
    times = []
    for item in held_out:
        start = time.perf_counter()
        sr = pipeline(item["lr"][None], generator=torch.Generator().manual_seed(seed))
        times.append((time.perf_counter() - start) * 1000)
        write_image(folder / HELD_OUT / f"{item['name']}.png", sr[0])
    timed = times[1:] or times
    return sum(timed) / len(timed)


class GlyphReader:
    """The headline measure, readability: a glyph classifier trained on the sharp glyphs of the demo's
    training pages, and the glyphs of each held-out pair (`headline.classifier` in conf/demo.yaml)."""

    def __init__(self, train_pages: DictConfig, held_out: DictConfig, classifier: DictConfig, seed: int):
        size, fonts = train_pages.page_size, tuple(train_pages.font_sizes)
        pages = [torch.from_numpy(render_page(p, size, fonts).copy()).permute(2, 0, 1) / 255
                 for p in range(train_pages.pages)]  # fmt: skip
        glyphs = [
            GlyphSet.inside(page_glyphs(p, size, fonts), (0, 0), size, size) for p in range(train_pages.pages)
        ]
        self.classifier: GlyphClassifier = train_glyph_classifier(pages, glyphs, seed=seed, **classifier)
        # the held-out pairs are centre crops of their pages (`DocumentPairedDataset`)
        offset = (held_out.page_size - held_out.crop_size) // 2
        self.glyphs = {
            f"page{p}": GlyphSet.inside(page_glyphs(p, held_out.page_size, tuple(held_out.font_sizes)),
                                        (offset, offset), held_out.crop_size, held_out.crop_size)
            for p in held_out.seeds
        }  # fmt: skip

    def __call__(self, folder: Path) -> float:
        """The readability of the held-out images in `folder` (<name>.png each)."""
        names = list(self.glyphs)
        images = [read_image(folder / f"{name}.png").rgb for name in names]
        return readability(self.classifier, images, [self.glyphs[n] for n in names])


def add_headline(means: dict, reader: GlyphReader, eval_dir: Path, methods: list[str]) -> None:
    """Each method's readability of its saved held-out images into its row of `means`."""
    for method in methods:
        means[method]["readability"] = reader(eval_dir / "images" / method / HELD_OUT)


def idle_cores(cores: int, seconds: float = 0.5) -> int:
    """How many of `cores` other processes leave idle, from the machine's idle time over `seconds`
    (/proc/stat); all of them where that cannot be read."""

    def idle_and_total() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle0, total0 = idle_and_total()
        time.sleep(seconds)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return cores
    machine = os.cpu_count() or cores
    free = (idle1 - idle0) / max(1, total1 - total0) * machine
    return max(1, min(cores, math.floor(free + 0.25)))


def thread_count(setting: int | None) -> int:
    """Torch's CPU threads: the setting, or the cores of this process that other processes leave idle. More
    threads than free cores make every step wait for the thread that is not running: on a machine where
    another job keeps one of two cores busy, training ran 8x slower with two threads than alone."""
    return int(setting) if setting else idle_cores(len(os.sched_getaffinity(0)))


def timing_ms(timing_csv: Path) -> dict[str, float]:
    """Mean milliseconds per image by method label ("AddSR-1", ...) from the evaluation's timing.csv."""
    with timing_csv.open() as handle:
        return {row["method"]: float(row["mean_ms"]) for row in csv.DictReader(handle)}


MEASURES = ("psnr", "ssim", "readability")


def summary_row(means: dict, label: str, ms: float | None) -> dict:
    return {**{k: v for k, v in means[label].items() if k in MEASURES}, "ms": ms}


def metrics_summary(means: dict, ms: dict, steps: list[int], many_steps: int, headline_name: str,
                    noise_floor: dict, ablation: dict) -> dict:  # fmt: skip
    """`outputs/demo/metrics.json`: bicubic; the teacher with many steps (`teacher`) and with each of the
    student's step counts (`teacher_steps`, the no-distillation baseline); the student per step count; the
    headline measure's name; the noise floor per step count; the ablation."""
    return {
        "bicubic": {k: v for k, v in means["Bicubic"].items() if k in MEASURES},
        "teacher": {
            **summary_row(means, f"Teacher-{many_steps}", ms.get(f"Teacher-{many_steps}")),
            "steps": many_steps,
        },
        "teacher_steps": {str(k): summary_row(means, f"Teacher-{k}", ms.get(f"Teacher-{k}")) for k in steps},
        "student": {str(k): summary_row(means, f"AddSR-{k}", ms.get(f"AddSR-{k}")) for k in steps},
        "headline": headline_name,
        "noise_floor": noise_floor,
        "ablation": ablation,
    }


# Headline values are float32 shares (of glyphs read, say): a difference of as many glyphs as the floor
# can land a rounding error above or below it. It must exceed the floor by more than this to count.
ROUNDING = 1e-6


def beyond(difference: float, floor: float) -> bool:
    """Whether `difference` exceeds the noise `floor`: a tie, to within float rounding, does not."""
    return difference - floor > ROUNDING


def judge(summary: dict, checks: DictConfig) -> dict:
    """The demo's claims, each judged from the numbers of `summary` on its headline measure:
    {name: {"passed": bool, "claim": str, ...its numbers}}.

    - distillation: at every step count the student beats the teacher sampled with as many steps by more
      than the noise floor (the spread of the headline over students trained with other seeds), so that a
      student that did not learn from its teacher fails;
    - near_many_step_teacher: at every step count the student stays within `near_tolerance` of the teacher's
      many-step result;
    - beats_bicubic: the 1-step student and the many-step teacher beat bicubic;
    - faster: the student is at least `min_speedup` times faster per image than the many-step teacher."""
    h = summary["headline"]
    student, few, teacher = summary["student"], summary["teacher_steps"], summary["teacher"]
    floor = summary["noise_floor"]
    margins = {k: student[k][h] - few[k][h] for k in student}
    near = {k: student[k][h] - teacher[h] for k in student}
    speedup = {k: teacher["ms"] / s["ms"] if s.get("ms") and teacher.get("ms") else float("nan")
               for k, s in student.items()}  # fmt: skip
    first = min(student, key=int)
    return {
        "distillation": {
            "passed": all(beyond(margins[k], floor.get(k, 0.0)) for k in student),
            "claim": f"the student beats the teacher sampled with as many steps on {h}, beyond the noise floor",
            "student": {k: student[k][h] for k in student}, "teacher": {k: few[k][h] for k in student},
            "margin": margins, "noise_floor": floor,
        },
        "near_many_step_teacher": {
            "passed": all(near[k] >= -checks.near_tolerance for k in student),
            "claim": f"the student stays within {checks.near_tolerance} of the teacher's "
                     f"{teacher['steps']}-step result on {h}",
            "student": {k: student[k][h] for k in student}, "teacher": teacher[h], "difference": near,
        },
        "beats_bicubic": {
            "passed": student[first][h] > summary["bicubic"][h] and teacher[h] > summary["bicubic"][h],
            "claim": f"the {first}-step student and the many-step teacher beat bicubic on {h}",
            "student": student[first][h], "teacher": teacher[h], "bicubic": summary["bicubic"][h],
        },
        "faster": {
            "passed": all(x >= checks.min_speedup for x in speedup.values()),
            "claim": f"the student is at least {checks.min_speedup}x faster per image than the many-step teacher",
            "speedup": speedup,
        },
    }  # fmt: skip


def metrics_table(summary: dict, methods: list[str]) -> str:
    """Every method's means on the held-out pairs, the headline measure marked."""
    h = summary["headline"]
    rows = {"Bicubic": summary["bicubic"], f"Teacher-{summary['teacher']['steps']}": summary["teacher"],
            **{f"Teacher-{k}": r for k, r in summary["teacher_steps"].items()},
            **{f"AddSR-{k}": r for k, r in summary["student"].items()}}  # fmt: skip
    read = "readability" in summary["bicubic"]
    lines = [f"Headline measure: **{h}**.", "",
             "| Method | PSNR | SSIM |" + (" readability |" if read else "") + " ms / image |",
             "|---|---:|---:|" + ("---:|" if read else "") + "---:|"]  # fmt: skip
    for label in methods:
        r = rows[label]
        ms = f"{r['ms']:.0f}" if r.get("ms") else "-"
        lines.append(f"| {label} | {r['psnr']:.2f} | {r['ssim']:.4f} |" + (f" {r['readability']:.3f} |" if read else "")
                     + f" {ms} |")  # fmt: skip
    return "\n".join(lines)


def checks_text(checks: dict) -> str:
    """One line per check: its claim, yes or NO, and its numbers."""

    def numbers(value) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {numbers(v)}" for k, v in value.items()) + "}"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    return "\n".join(
        f"- {name}: {'yes' if c['passed'] else 'NO'}: {c['claim']} ("
        + "; ".join(f"{k} {numbers(v)}" for k, v in c.items() if k not in ("passed", "claim"))
        + ")"
        for name, c in checks.items()
    )


def train_student(settings, run: Path, base: list[str], overrides: list[str], steps: int) -> Path:
    """A student distilled from the demo's teacher (`base` names its weights); returns the exported folder."""
    cfg = compose_config(
        "train", run, [*base, f"trainer.max_steps={steps}", *settings.student.overrides, *overrides]
    )
    return Path(train(cfg)["student"])


def score_student(
    student: Path, run: Path, ev, steps: list[int], reader, seed: int
) -> dict[str, dict[str, float]]:
    """A student's means per step count ("AddSR-<k>") on the held-out pairs, the headline included, its
    sampler's noise drawn from `seed`."""
    eval_cfg = eval_config(run / "evaluation", [
        f"student={student}", f"metrics.names=[{','.join(ev.metrics)}]", f"steps=[{','.join(map(str, steps))}]",
        "include_bicubic=false", "+upscale.color_fix=none", f"+upscale.seed={seed}"], ev.dataset)  # fmt: skip
    means = summary_rows(evaluate(eval_cfg)["records"])
    add_headline(means, reader, run / "evaluation", [f"AddSR-{k}" for k in steps])
    return means


def noise_floor(
    settings, out: Path, base: list[str], ev, steps: list[int], main: dict, reader, h: str
) -> dict:
    """The spread (max - min) of the headline per step count over the main student and one student per seed
    of `noise_floor.seeds` (the same teacher and settings; the seed draws both the training's randomness and
    the sampler's noise): differences below it are noise."""
    runs = [main]
    for seed in settings.noise_floor.seeds:
        run = out / "noise_floor" / f"seed{seed}"
        student = train_student(settings, run, [*base, f"seed={seed}"], [], settings.student.max_steps)
        runs.append(score_student(student, run, ev, steps, reader, seed))
    return {
        str(k): max(r[f"AddSR-{k}"][h] for r in runs) - min(r[f"AddSR-{k}"][h] for r in runs) for k in steps
    }


def run_ablation(settings, out: Path, base: list[str], ev, reader) -> dict:
    """One student per cell of `settings.ablation.cells` (the same teacher, one setting changed), each
    scored at 1 step on the held-out pairs: {cell: {"overrides", measures...}} as measured."""
    results = {}
    for cell, overrides in settings.ablation.cells.items():
        run = out / "ablation" / cell
        student = train_student(settings, run, base, list(overrides), settings.ablation.max_steps)
        results[cell] = {
            "overrides": list(overrides),
            **score_student(student, run, ev, [1], reader, settings.seed)["AddSR-1"],
        }
    return results


def ablation_table(full: dict, ablation: dict, headline_name: str, floor: float) -> str:
    """The cells against the full method at 1 step, and whether each moves the headline beyond the noise floor."""
    h = headline_name
    lines = [f"| Cell | Overrides | PSNR | SSIM | {h} | {h} - full | beyond the noise floor ({floor:.3f})? |",
             "|---|---|---:|---:|---:|---:|---|",
             f"| full (PSR on, TA exponential, HR teacher) | - | {full['psnr']:.2f} | {full['ssim']:.4f} "
             f"| {full[h]:.3f} | | |"]  # fmt: skip
    for cell, r in ablation.items():
        moved = beyond(abs(r[h] - full[h]), floor)
        lines.append(f"| {cell} | {' '.join(r['overrides'])} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r[h]:.3f} "
                     f"| {r[h] - full[h]:+.3f} | {'yes' if moved else 'no'} |")  # fmt: skip
    if ablation:
        moved = [cell for cell, r in ablation.items() if beyond(abs(r[h] - full[h]), floor)]
        within = [cell for cell in ablation if cell not in moved]
        lines += ["", " ".join(
            ([f"Beyond the noise floor: {', '.join(moved)}."] if moved else [])
            + ([f"Within it, so not shown to matter at this size and length: {', '.join(within)}."] if within else []))]  # fmt: skip
    return "\n".join(lines)


def last_run(rows: list[dict]) -> list[dict]:
    """The rows of a log's last run: a log that holds several runs back to back (the iteration falls back)
    would draw their curves joined by a diagonal line."""
    iterations = [float(r["train/iteration"]) if r.get("train/iteration") else None for r in rows]
    seen = [(i, it) for i, it in enumerate(iterations) if it is not None]
    starts = [i for (_, a), (i, b) in zip(seen, seen[1:]) if b < a]
    return rows[starts[-1] :] if starts else rows


def read_log(run_dir: Path) -> list[dict]:
    """A run's CSV log rows (a committed teacher's `teacher_log.csv`), of its last run only."""
    logs = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    logs += sorted(run_dir.glob("teacher_log.csv"))
    if not logs:
        return []
    with logs[-1].open() as handle:
        return last_run(list(csv.DictReader(handle)))


def plot_losses(teacher_rows: list[dict], student_rows: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(9, 3))
    curves = [("teacher: Eq. 2 loss", teacher_rows, ["train/loss"]),
              ("student: distillation", student_rows, ["train/loss_dis"]),
              ("student: adversarial", student_rows, ["train/loss_g_adv", "train/loss_d"])]  # fmt: skip
    for i, (title, rows, keys) in enumerate(curves):
        ax = fig.add_subplot(1, 3, i + 1)
        for key in keys:
            points = [
                (float(r["train/iteration"]), float(r[key]))
                for r in rows
                if r.get(key) and r.get("train/iteration")
            ]
            if points:
                ax.plot(*zip(*points), label=key.removeprefix("train/"))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_ta(method: dict, path: Path) -> Path:
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot(1, 1, 1)
    n = len(method["student_timesteps"])
    for schedule in ("exponential", "linear", "none"):
        ax.plot(range(1, n + 1), ta_weights(schedule, n, **method["ta"]).numpy(), marker="o", label=schedule)
    ax.set_xticks(
        range(1, n + 1), [f"{s}\nt={t}" for s, t in zip(range(1, n + 1), method["student_timesteps"])]
    )
    ax.set_ylabel("TA weight of the distillation loss")
    ax.set_title(f"TA schedules (this run: {method['ta_schedule']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def image_grids(eval_dir: Path, held_out, methods: list[str], out: Path) -> list[Path]:
    from addsr_pl.inference.io import read_image

    paths = []
    for item in held_out:
        lr_up = F.interpolate(item["lr"][None], scale_factor=4, mode="nearest")[0]
        tiles = [lr_up] + [
            read_image(eval_dir / "images" / m / HELD_OUT / f"{item['name']}.png").rgb for m in methods
        ]
        path = out / f"grid_{item['name']}.png"
        save_image(
            make_grid(torch.stack([*tiles, item["hr"]]), nrow=len(tiles) + 1, padding=2, pad_value=1), path
        )
        paths.append(path)
    return paths


def summary_rows(records_csv: Path) -> dict[str, dict[str, float]]:
    sums: dict[str, dict[str, list[float]]] = {}
    with records_csv.open() as handle:
        for row in csv.DictReader(handle):
            label = row["method"] + (f"-{row['steps']}" if row["steps"] else "")
            for key in ("psnr", "ssim"):
                if row.get(key):
                    sums.setdefault(label, {}).setdefault(key, []).append(float(row[key]))
    return {label: {k: sum(v) / len(v) for k, v in metrics.items()} for label, metrics in sums.items()}


def verdict(means: dict[str, dict[str, float]], codec_psnr: float, teacher_label: str) -> str:
    """Why the student does or does not beat bicubic here, from the measured numbers."""
    bicubic = means["Bicubic"]["psnr"]
    teacher = means[teacher_label]["psnr"]
    students = {k: v["psnr"] for k, v in means.items() if k.startswith("AddSR-")}
    best = max(students, key=students.get)
    ceiling = (
        "The codec is lossless (pixel unshuffle), so no decoder error caps these numbers."
        if math.isinf(codec_psnr)
        else f"Everything is decoded by the tiny codec, whose own reconstruction of the held-out HR images "
        f"reaches {codec_psnr:.2f} dB: an upper bound for any method decoded by it."
    )
    if students[best] > bicubic:
        head = (f"Yes: {best} reaches {students[best]:.2f} dB against bicubic's {bicubic:.2f} dB on the held-out "
                "pairs.")  # fmt: skip
    else:
        head = (f"Not at this size: the best student, {best}, reaches {students[best]:.2f} dB against bicubic's "
                f"{bicubic:.2f} dB on the held-out pairs.")  # fmt: skip
    behind = [k.removeprefix("AddSR-") for k in sorted(students) if students[k] < teacher - 1]
    psr = (
        f" At {', '.join(behind)} steps the student is more than 1 dB under the teacher: from step 2 on, PSR "
        "controls each step with the student's own previous prediction, which the student reads only as well "
        "as its teacher learned to read controls sharper than the LR (the teacher stage's "
        "`method.control_hr_blend`; docs/benchmarks.md measures both)."
        if behind and behind != ["1"]
        else ""
    )
    return (
        f"{head}{psr} {ceiling} The demo's domain is narrow on purpose (`data` in conf/demo.yaml): on rendered text "
        "pages bicubic smears every stroke, and a model of a few million parameters learns to restore them in "
        "minutes on a CPU. On photos the same tiny models need far longer (docs/benchmarks.md, 'The demo's "
        "checks'); the real setting is SD2, SeeSR and the paper's data, on a GPU."
    )


def write_report(out: Path, sections: dict) -> tuple[Path, Path]:
    md = ["# AddSR demo report", "",
          "**These are tiny models** (a few million parameters, random initialisation, minutes of CPU training "
          "on rendered text pages). They show every stage of the pipeline running end to end and the method "
          "working on a narrow domain; their numbers say nothing about AddSR's quality on photos.", ""]  # fmt: skip
    htm = ["<html><head><meta charset='utf-8'><title>AddSR demo report</title></head><body>",
           "<h1>AddSR demo report</h1>", f"<p><b>These are tiny models</b>. {html.escape(md[2].split('**')[2])}</p>"]  # fmt: skip
    for title, (text, images) in sections.items():
        md += [f"## {title}", "", text, ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in images] + [""]
        lines = text.strip().splitlines()
        if lines and all(line.startswith("- ") for line in lines):  # a list: one item per line
            body = "<ul>" + "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines) + "</ul>"
        elif text.lstrip().startswith("<"):
            body = text
        elif "|" in text:
            body = f"<pre>{html.escape(text)}</pre>"
        else:
            body = f"<p>{html.escape(text)}</p>"
        htm += [f"<h2>{html.escape(title)}</h2>", body] + [
            f"<img src='{p.relative_to(out)}' style='max-width:100%'>" for p in images
        ]
    htm.append("</body></html>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("\n".join(htm))
    return out / "report.html", out / "report.md"


REPORT_SECTIONS = (
    "Does the method work here?",
    "Metrics",
    "Ablation",
    "Does the student beat bicubic?",
    "Images",
    "Loss curves",
    "TA schedule",
    "Perception-distortion",
    "Timing",
    "Runs",
)


def main(argv: list[str] | None = None) -> None:
    """`python -m addsr_pl.demo [key=value ...]`: conf/demo.yaml with dotted overrides."""
    overrides = OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv)
    settings = OmegaConf.merge(OmegaConf.load(config_dir() / "demo.yaml"), overrides)
    torch.set_num_threads(thread_count(settings.threads))
    out = Path(settings.output_dir).resolve()
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = ["model=tiny", f"data={settings.data}", "trainer=cpu", "logger=csv", f"seed={settings.seed}",
            f"data.crop_size={settings.crop_size}", f"paths.cache_dir={out / 'cache'}", *settings.model_overrides]  # fmt: skip

    if settings.make_teacher:
        make_teacher(settings, out, base)
        return
    ev = settings.evaluation
    held_out = instantiate(ev.dataset)
    checkpoint = teacher_checkpoint(settings)
    teacher_run = out / "teacher"
    for run in (teacher_run, out / "student", out / "ablation", out / "noise_floor", out / "teacher_outputs"):
        fresh_run(run)
    if checkpoint is not None:
        print(
            f"[1/7] the codec and [2/7] the teacher: committed, {checkpoint} (`make demo-teacher` made them)"
        )
        vae_dir, teacher_dir, teacher_run = checkpoint, checkpoint, checkpoint
    else:
        print("[1/7] preparing the codec")
        vae_dir = prepare_codec(settings.codec, out / "vae_fit", settings.seed, base)
        print("[2/7] training the tiny teacher")
        teacher_dir = train_teacher(
            teacher_run, base, vae_dir, settings.teacher.max_steps, settings.teacher.overrides
        )
    student_base = [*base, f"model.components.vae_path={vae_dir}", f"model.components.unet_path={teacher_dir}",
                    f"model.components.controlnet_path={teacher_dir}"]  # fmt: skip

    print("[3/7] distilling the tiny AddSR student")
    student_run = out / "student"
    student_cfg = compose_config("train", student_run, [
        *student_base, f"trainer.max_steps={settings.student.max_steps}", *settings.student.overrides])  # fmt: skip
    student_dir = Path(train(student_cfg)["student"])
    steps = list(compose_config("eval", out / "evaluation", []).steps)

    print(f"[4/7] evaluating bicubic, the teacher with {', '.join(map(str, steps))} and {ev.teacher_steps} "
          "steps, and the student")  # fmt: skip
    reader = GlyphReader(student_cfg.data.train, ev.dataset,
                         settings.headline.classifier, settings.seed) if settings.data == "documents" else None  # fmt: skip
    headline_name = "readability" if reader else "psnr"
    teacher_label = f"Teacher-{ev.teacher_steps}"
    teachers = teacher_pipelines(teacher_dir, student_dir, [*steps, ev.teacher_steps], ev.teacher_renoise)
    teacher_ms = {
        f"Teacher-{k}": render(teacher, held_out, out / "teacher_outputs" / f"Teacher-{k}", settings.seed)
        for k, teacher in teachers.items()
    }
    codec_psnr = codec_ceiling(teachers[ev.teacher_steps].codec, held_out)
    eval_dir = out / "evaluation"
    eval_cfg = eval_config(eval_dir, [
        f"student={student_dir}", f"metrics.names=[{','.join(ev.metrics)}]", "pd_plot.y_metric=ssim",
        *(f"+baselines.{label}={out / 'teacher_outputs' / label}" for label in teacher_ms),
        "+upscale.color_fix=none", f"+upscale.seed={settings.seed}"], ev.dataset)  # fmt: skip
    paths = evaluate(eval_cfg)
    means = summary_rows(paths["records"])
    methods = ["Bicubic", *teacher_ms, *(f"AddSR-{k}" for k in steps)]
    if reader:
        add_headline(means, reader, eval_dir, methods)

    print(f"[5/7] the noise floor: {len(settings.noise_floor.seeds)} more students with other seeds")
    floor = (
        noise_floor(settings, out, student_base, ev, steps, means, reader, headline_name)
        if settings.noise_floor.seeds
        else {}
    )

    print("[6/7] the ablation: one student per cell, scored at 1 step")
    ablation = run_ablation(settings, out, student_base, ev, reader) if settings.ablation.cells else {}

    print("[7/7] writing the report")
    summary = metrics_summary(means, {**timing_ms(paths["timing_csv"]), **teacher_ms}, steps, ev.teacher_steps,
                              headline_name, floor, ablation)  # fmt: skip
    summary["checks"] = judge(summary, settings.checks)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    grids = image_grids(eval_dir, held_out, methods[:1] + [f"Teacher-{k}" for k in steps[:1]] + [teacher_label]
                        + [f"AddSR-{k}" for k in steps], figures)  # fmt: skip
    sections = {
        "Does the method work here?": (checks_text(summary["checks"]), []),
        "Metrics": (metrics_table(summary, methods) + "\n\n" + paths["markdown"].read_text(), []),
        "Ablation": (f"Each cell is a student trained as long as the main one with one setting changed, "
                     f"scored at 1 step; the noise floor is the spread of {headline_name} at 1 step over "
                     f"{1 + len(settings.noise_floor.seeds)} students that differ only in their seed:\n\n"
                     + ablation_table(summary["student"]["1"], ablation, headline_name, floor.get("1", 0.0)), []),
        "Does the student beat bicubic?": (verdict(means, codec_psnr, teacher_label), []),
        "Images": ("Each row: LR (nearest x4) | Bicubic | Teacher-1 | " + teacher_label + " | "
                   + " | ".join(f"AddSR-{k}" for k in steps) + " | HR.", grids),
        "Loss curves": ("Training losses of the teacher (Eq. 2) and the student (TA-weighted distillation, G and D).",
                        [plot_losses(read_log(teacher_run), read_log(student_run), figures / "losses.png")]),
        "TA schedule": ("The timestep-adapting weight of the distillation loss per student step.",
                        [plot_ta(OmegaConf.to_container(student_cfg.method, resolve=True), figures / "ta_schedule.png")]),
        "Perception-distortion": ("Mean PSNR against mean SSIM per student step count (paper Fig. 5a uses a "
                                  "no-reference metric; the tiny demo has no metric weights).", [paths["pd_plot"]]),
        "Timing": (paths["timing_markdown"].read_text(), []),
        "Runs": (json.dumps({"vae": str(vae_dir), "teacher": str(teacher_dir), "student": str(student_dir),
                             "evaluation": str(eval_dir), "minutes": round((time.perf_counter() - start) / 60, 1)}, indent=2), []),
    }  # fmt: skip
    report_html, report_md = write_report(out, sections)
    print(f"Report: {report_html}\n        {report_md}")


if __name__ == "__main__":
    main()
