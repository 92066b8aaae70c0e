"""`make demo`: prepare a tiny codec, train a tiny teacher, distil a tiny AddSR student, evaluate, report.

Everything runs on the CPU on rendered text pages (`conf/demo.yaml`, `conf/data/documents.yaml`), with
nothing to download; the report is written to `outputs/demo/report.html` and `report.md`.
"""

from __future__ import annotations

import csv
import html
import json
import math
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
from addsr_pl.evaluate import evaluate
from addsr_pl.inference.io import write_image
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


def teacher_pipeline(
    teacher_dir: Path, student_dir: Path, steps: int, renoise: str = "ddim"
) -> AddSRPipeline:
    """The trained teacher as an upscaler: the student's sampler over `steps` evenly spaced timesteps,
    with DDIM's deterministic re-noising (`renoise`; the student's fresh noise at each of many steps
    piles up the errors of an imperfect tiny teacher)."""
    student = AddSRPipeline.from_folder(student_dir)
    cls_unet, cls_cn = type(student.denoiser.unet), type(student.denoiser.controlnet)
    denoiser = Denoiser(cls_unet.from_pretrained(teacher_dir, subfolder="unet"),
                        cls_cn.from_pretrained(teacher_dir, subfolder="controlnet")).eval()  # fmt: skip
    timesteps = torch.linspace(999, 0, steps + 1)[:-1].round().long().tolist()
    return AddSRPipeline(denoiser, student.codec, student.conditioner, student.alphas_cumprod, timesteps,
                         psr=False, psr_weight=0.0, scale=student.scale,
                         prediction_type=student.prediction_type, renoise=renoise)  # fmt: skip


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


def timing_ms(timing_csv: Path) -> dict[str, float]:
    """Mean milliseconds per image by method label ("AddSR-1", ...) from the evaluation's timing.csv."""
    with timing_csv.open() as handle:
        return {row["method"]: float(row["mean_ms"]) for row in csv.DictReader(handle)}


def metrics_summary(means: dict, ms: dict, teacher_label: str, teacher_ms: float, ablation: dict) -> dict:
    """`outputs/demo/metrics.json`: bicubic, the teacher and the student per step count, the ablation."""
    pick = {"psnr", "ssim"}
    students = sorted(k for k in means if k.startswith("AddSR-"))
    return {
        "bicubic": {k: v for k, v in means["Bicubic"].items() if k in pick},
        "teacher": {**{k: v for k, v in means[teacher_label].items() if k in pick}, "ms": teacher_ms},
        "student": {
            label.removeprefix("AddSR-"): {
                **{k: v for k, v in means[label].items() if k in pick},
                "ms": ms.get(label),
            }  # fmt: skip
            for label in students
        },
        "ablation": ablation,
    }


def headline(summary: dict) -> str:
    """The demo's claims, each with its measured numbers and whether it holds (the student's at every
    step count it was scored at)."""
    bicubic, teacher = summary["bicubic"], summary["teacher"]
    students = {k: summary["student"][k] for k in sorted(summary["student"], key=int)}
    one_step = students[min(students, key=int)]
    close = {k: s["psnr"] >= teacher["psnr"] - 1 for k, s in students.items()}
    speedup = {k: teacher["ms"] / s["ms"] if s.get("ms") else float("nan") for k, s in students.items()}

    def mark(ok: bool) -> str:
        return "yes" if ok else "NO"

    return "\n".join([
        f"- Teacher beats bicubic on PSNR: {mark(teacher['psnr'] > bicubic['psnr'])} "
        f"({teacher['psnr']:.2f} vs {bicubic['psnr']:.2f} dB)",
        f"- 1-step student beats bicubic on PSNR: {mark(one_step['psnr'] > bicubic['psnr'])} "
        f"({one_step['psnr']:.2f} vs {bicubic['psnr']:.2f} dB)",
        f"- Student within 1 dB of the teacher ({teacher['psnr']:.2f} dB) at every step count: "
        f"{mark(all(close.values()))} (" + ", ".join(
            f"{k}: {s['psnr']:.2f} dB {mark(close[k])}" for k, s in students.items()) + ")",
        f"- Student at least 10x faster than the teacher per image at every step count: "
        f"{mark(all(x >= 10 for x in speedup.values()))} (" + ", ".join(
            f"{k}: {x:.1f}x {mark(x >= 10)}" for k, x in speedup.items()) + ")",
    ])  # fmt: skip


def run_ablation(settings, out: Path, base: list[str], ev) -> dict:
    """One short student run per cell of `settings.ablation.cells` (the same teacher), each scored at
    1 step on the held-out pairs: {cell: {"psnr", "ssim"}} as measured."""
    results = {}
    for cell, overrides in settings.ablation.cells.items():
        run = out / "ablation" / cell
        student = Path(train(compose_config("train", run, [
            *base, f"trainer.max_steps={settings.ablation.max_steps}", *settings.student.overrides, *overrides]))["student"])  # fmt: skip
        eval_cfg = eval_config(run / "evaluation", [
            f"student={student}", f"metrics.names=[{','.join(ev.metrics)}]", "steps=[1]", "include_bicubic=false",
            "save_images=false", "+upscale.color_fix=none"], ev.dataset)  # fmt: skip
        means = summary_rows(evaluate(eval_cfg)["records"])
        results[cell] = {"overrides": list(overrides), **means["AddSR-1"]}
    return results


def ablation_table(full: dict, ablation: dict, spread_floor: float) -> str:
    lines = ["| Cell | Overrides | PSNR (1 step) | SSIM (1 step) |", "|---|---|---:|---:|",
             f"| full (PSR on, TA exponential, HR teacher) | - | {full['psnr']:.2f} | {full['ssim']:.4f} |"]  # fmt: skip
    lines += [
        f"| {cell} | {' '.join(r['overrides'])} | {r['psnr']:.2f} | {r['ssim']:.4f} |"
        for cell, r in ablation.items()
    ]
    psnrs = [full["psnr"], *(r["psnr"] for r in ablation.values())]
    if ablation and max(psnrs) - min(psnrs) < spread_floor:
        lines += ["", f"The cells differ by {max(psnrs) - min(psnrs):.3f} dB, less than {spread_floor} dB: at this "
                  "length the students have hardly moved from the teacher they start from, so this ablation "
                  "cannot tell the settings apart here."]  # fmt: skip
    return "\n".join(lines)


def read_log(run_dir: Path) -> list[dict]:
    """A run's CSV log rows (a committed teacher's `teacher_log.csv`)."""
    rows = []
    for path in sorted([*run_dir.glob("csv/*/metrics.csv"), *run_dir.glob("teacher_log.csv")]):
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    return rows


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
        "The codec is lossless (pixel unshuffle at SD's factor 8), so no decoder error caps these numbers."
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
        "PSNR checks'); the real setting is SD2, SeeSR and the paper's data, on a GPU."
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
        body = (
            text
            if text.lstrip().startswith("<")
            else f"<pre>{html.escape(text)}</pre>"
            if "|" in text
            else f"<p>{html.escape(text)}</p>"
        )
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
    for run in (teacher_run, out / "student", out / "ablation"):
        fresh_run(run)
    if checkpoint is not None:
        print(
            f"[1/6] the codec and [2/6] the teacher: committed, {checkpoint} (`make demo-teacher` made them)"
        )
        vae_dir, teacher_dir, teacher_run = checkpoint, checkpoint, checkpoint
    else:
        print("[1/6] preparing the codec")
        vae_dir = prepare_codec(settings.codec, out / "vae_fit", settings.seed, base)
        print("[2/6] training the tiny teacher")
        teacher_dir = train_teacher(
            teacher_run, base, vae_dir, settings.teacher.max_steps, settings.teacher.overrides
        )
    with_vae = [*base, f"model.components.vae_path={vae_dir}"]

    print("[3/6] distilling the tiny AddSR student")
    student_run = out / "student"
    student_cfg = compose_config("train", student_run, [
        *with_vae, f"model.components.unet_path={teacher_dir}", f"model.components.controlnet_path={teacher_dir}",
        f"trainer.max_steps={settings.student.max_steps}", *settings.student.overrides])  # fmt: skip
    student_dir = Path(train(student_cfg)["student"])

    print("[4/6] evaluating bicubic, the teacher and the student")
    teacher_label = f"Teacher-{ev.teacher_steps}"
    teacher_images = out / "teacher_outputs"
    teacher = teacher_pipeline(teacher_dir, student_dir, ev.teacher_steps, ev.teacher_renoise)
    teacher_ms = render(teacher, held_out, teacher_images, settings.seed)
    codec_psnr = codec_ceiling(teacher.codec, held_out)
    eval_dir = out / "evaluation"
    eval_cfg = eval_config(eval_dir, [
        f"student={student_dir}", f"metrics.names=[{','.join(ev.metrics)}]", "pd_plot.y_metric=ssim",
        f"+baselines.{teacher_label}={teacher_images}", "+upscale.color_fix=none"], ev.dataset)  # fmt: skip
    paths = evaluate(eval_cfg)
    means = summary_rows(paths["records"])

    print("[5/6] the ablation: one short student per cell, scored at 1 step")
    student_base = [
        *with_vae,
        f"model.components.unet_path={teacher_dir}",
        f"model.components.controlnet_path={teacher_dir}",
    ]
    ablation = run_ablation(settings, out, student_base, ev) if settings.ablation.cells else {}

    print("[6/6] writing the report")
    summary = metrics_summary(means, timing_ms(paths["timing_csv"]), teacher_label, teacher_ms, ablation)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    methods = [teacher_label, *(f"AddSR-{k}" for k in eval_cfg.steps)]
    grids = image_grids(eval_dir, held_out, ["Bicubic", *methods], figures)
    sections = {
        "Does the method work here?": (headline(summary), []),
        "Metrics": (paths["markdown"].read_text(), []),
        "Ablation": ("Each cell is a student trained as long as the main one with one setting changed, "
                     "scored at 1 step, as measured:\n\n"
                     + ablation_table(summary["student"]["1"], ablation, settings.ablation.spread_floor_db), []),
        "Does the student beat bicubic?": (verdict(means, codec_psnr, teacher_label), []),
        "Images": ("Each row: LR (nearest x4) | Bicubic | " + " | ".join(methods) + " | HR.", grids),
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
