"""The teacher stage: a SeeSR-style ControlNet SR model trained with the diffusion loss (paper Eq. 2).

AddSR distils a trained teacher; this stage trains one on the same data pipeline and model presets.
The teacher sees what a deployed SR model sees: the control image is the bicubic-upscaled LR in
[0, 1], and its prompt and representation come from the LR. The noisy latent is the HR latent
noised at a random timestep, and the loss is the MSE between predicted and true noise.
`method.control_hr_blend` moves a fraction of the control images towards the HR, so that the teacher
also reads controls as sharp as the ones AddSR gives it (the HR) and its student (PSR's predictions).

The trained teacher is exported as a folder with `unet/` and `controlnet/` (diffusers
`save_pretrained`), which `model.components.unet_path` / `controlnet_path` of the AddSR stage read.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from addsr_pl.core.noise_schedule import noise_schedule_from
from addsr_pl.core.sampler import Denoiser, upscale
from addsr_pl.method.checkpointing import TrainedStateCheckpoint
from addsr_pl.method.ema import EMA
from addsr_pl.method.module import PRECISION_DTYPES, mix_seed
from addsr_pl.models.conditioning import Conditioner, Conditioning
from addsr_pl.models.vae import VaeCodec

TEACHER_PARTS = ("unet", "controlnet")


def select_teacher_trainable(
    unet: nn.Module, controlnet: nn.Module, unet_trainable_modules: list[str], train_whole_unet: bool = False
) -> None:
    """SeeSR's trainable set: the whole ControlNet plus the UNet modules whose names end with one of
    `unet_trainable_modules` (SeeSR: `image_attentions`; a plain SD2 UNet has none). With
    `train_whole_unet` every UNet weight trains too: a randomly initialised UNet (the tiny presets) has
    no pretrained prior worth keeping frozen."""
    unet.requires_grad_(train_whole_unet)
    controlnet.requires_grad_(True)
    suffixes = tuple(unet_trainable_modules)
    for name, module in unet.named_modules():
        if suffixes and name.endswith(suffixes):
            module.requires_grad_(True)


class TeacherModule(TrainedStateCheckpoint, pl.LightningModule):
    """Trains the teacher UNet + ControlNet with the epsilon-prediction loss, conditioned on the LR.

    Args:
        model: the `model` config group as a plain dict (its `discriminator` is not used here).
        conditioning: the `conditioning` group (prompt source and strings, tagger).
        method: the `method` group of `conf/method/teacher.yaml`.
        seed: the run's seed; random draws of step n on rank r come from (seed, r, n).
    """

    MICRO_STEP_KEY = "teacher_micro_step"

    def __init__(self, model: dict, conditioning: dict, method: dict, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold only the trained weights; see on_load_checkpoint
        self.method = method
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            components = instantiate(model["components"], _convert_="all")
        if components.backbone != "sd2":
            raise ValueError(
                f"stage=teacher trains SD2 / SeeSR teachers; model={components.backbone} has none here: give "
                "a trained teacher's folders (model.components.*_path) to stage=addsr"
            )
        self.noise_schedule = noise_schedule_from(components.scheduler, "teacher")
        self.codec = VaeCodec(components.vae)
        self.conditioner = Conditioner.from_config(
            components.text_encoder, components.tokenizer, components.unet, conditioning
        )
        self.denoiser = Denoiser(components.unet, components.controlnet, method["conditioning_scale"])
        self.codec.requires_grad_(False).eval()
        self.conditioner.requires_grad_(False).eval()
        select_teacher_trainable(
            components.unet,
            components.controlnet,
            method["unet_trainable_modules"],
            method["train_whole_unet"],
        )
        self.ema = EMA(dict(self.trainable()), method["ema_decay"]) if method["ema_decay"] else None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.micro_step = 0

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.denoiser.named_parameters() if p.requires_grad]

    def setup(self, stage: str) -> None:
        """Frozen parts in the compute dtype of the trainer's precision; trained weights stay fp32."""
        dtype = PRECISION_DTYPES.get(str(self.trainer.precision), torch.float32)
        self.codec.to(dtype)
        self.conditioner.to(dtype)
        for p in self.denoiser.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def train(self, mode: bool = True) -> TeacherModule:
        super().train(mode)
        self.codec.eval()
        self.conditioner.eval()
        return self

    def generators(self, *parts: int) -> tuple[torch.Generator, torch.Generator]:
        """(CPU, device) generators seeded from (seed, *parts): training draws (seed, rank, micro-step),
        so ranks differ and a resumed run draws what the uninterrupted run would have."""
        s = mix_seed(self.seed, *parts)
        cpu = torch.Generator().manual_seed(s)
        dev = torch.Generator(device=self.device).manual_seed(s) if self.device.type != "cpu" else cpu
        return cpu, dev

    # ----------------------------------------------------------------- Eq. 2
    def diffusion_loss(
        self, hr: Tensor, lr: Tensor, t: Tensor, noise: Tensor, blank: Tensor, hr_blend: Tensor | None = None
    ) -> Tensor:
        """Per-sample ||eps - eps_theta(z_t, t, LR)||^2 (Eq. 2), averaged over the latent; for a
        v-prediction model the same with v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z0 as target.

        z_t noises the HR latent (Eq. 1); the control image is the upscaled LR, and the prompt and
        representation are computed from it; `blank` samples get the empty prompt. `hr_blend` (one weight
        w per sample) moves the control image to w * HR + (1 - w) * LR (`method.control_hr_blend`).
        """
        lr_up = upscale(lr, hr.shape[-2:])
        if hr_blend is not None:
            w = hr_blend.to(lr_up.dtype).view(-1, 1, 1, 1)
            lr_up = w * hr.to(lr_up.dtype) + (1 - w) * lr_up
        with torch.no_grad():
            z0 = self.codec.encode(hr)
        z_t = self.noise_schedule.add_noise(z0, noise.to(z0.dtype), t)  # Eq. 1
        conditioning = Conditioning(
            self.conditioner.text_embeds(lr_up, blank), self.conditioner.represent(lr_up)
        )
        prediction = self.denoiser(z_t, self.noise_schedule.model_timestep(t), lr_up, conditioning)
        target = self.noise_schedule.prediction_target(z0, noise, t)
        return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hr, lr = batch["hr"], batch["lr"]
        b = hr.shape[0]
        g_cpu, g_dev = self.generators(self.global_rank, self.micro_step)
        low, high = self.method["timestep_range"]
        t = torch.randint(low, high, (b,), generator=g_dev, device=self.device)
        latent_shape = (b, self.codec.latent_channels, *self.latent_size(hr))
        noise = torch.randn(latent_shape, generator=g_dev, device=self.device)
        blank = torch.rand(b, generator=g_cpu) < self.method["null_text_ratio"]
        loss = self.diffusion_loss(hr, lr, t, noise, blank, self.control_hr_blend(b, g_cpu)).mean()
        self.micro_step += 1
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=b)
        self.log("train/iteration", self.iteration.float(), batch_size=b)
        return loss

    def control_hr_blend(self, b: int, g_cpu: torch.Generator) -> Tensor | None:
        """Per-sample HR weights of the control image: w ~ U(0, 1) for a `method.control_hr_blend`
        fraction of the samples, 0 (the LR) for the rest; None when that fraction is 0 (SeeSR)."""
        fraction = self.method["control_hr_blend"]
        if not fraction:
            return None
        chosen = torch.rand(b, generator=g_cpu) < fraction
        return (torch.rand(b, generator=g_cpu) * chosen).to(self.device)

    def latent_size(self, images: Tensor) -> tuple[int, int]:
        f = self.codec.scale_factor
        return images.shape[-2] // f, images.shape[-1] // f

    def optimizer_step(self, *args, **kwargs) -> None:
        """One iteration = one optimizer step (after gradient accumulation); EMA follows it."""
        super().optimizer_step(*args, **kwargs)
        self.iteration += 1
        if self.ema is not None:
            self.ema.update()

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._ema_context = self.ema.swapped_in() if self.ema is not None else None
        if self._ema_context is not None:
            self._ema_context.__enter__()

    def on_validation_epoch_end(self) -> None:
        if self._ema_context is not None:
            self._ema_context.__exit__(None, None, None)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Eq. 2 at fixed timesteps with fixed noise, full prompt: a curve comparable across runs."""
        hr, lr = batch["hr"], batch["lr"]
        b = hr.shape[0]
        _, g_dev = self.generators(batch_idx)
        noise = torch.randn(
            (b, self.codec.latent_channels, *self.latent_size(hr)),
            generator=g_dev,
            device=self.device,
        )
        blank = torch.zeros(b, dtype=torch.bool)
        losses = []
        for timestep in self.method["val_timesteps"]:
            t = torch.full((b,), int(timestep), device=self.device, dtype=torch.long)
            loss = self.diffusion_loss(hr, lr, t, noise, blank).mean()
            self.log(f"val/loss_t{int(timestep)}", loss, batch_size=b, sync_dist=True)
            losses.append(loss)
        self.log("val/loss", torch.stack(losses).mean(), batch_size=b, sync_dist=True)

    # ----------------------------------------------------------------- optimisation
    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """SeeSR's max_grad_norm, from `method.grad_clip` (Lightning has unscaled the gradients here)."""
        if self.method["grad_clip"]:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.method["grad_clip"], gradient_clip_algorithm="norm"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for _, p in self.trainable() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.log("train/grad_norm", norm.float())
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        # plain containers in the optimizer state: checkpoints stay readable to a weights-only load
        optimizer = instantiate(
            self.method["optimizer"], params=[p for _, p in self.trainable()], _convert_="all"
        )
        scheduler = instantiate(self.method["lr_scheduler"], optimizer=optimizer, _convert_="all")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints
    def trained_state_keys(self) -> set[str]:
        """What a checkpoint holds: the trained weights, their EMA, the iteration counter."""
        keys = {f"denoiser.{n}" for n, _ in self.trainable()}
        if self.ema is not None:
            keys |= {f"ema.{k}" for k in self.ema.state_dict()}
        return keys | {"iteration"}


def export_teacher(module: TeacherModule, out_dir: str | Path) -> Path:
    """Write the trained teacher (the EMA weights where kept) as `unet/` and `controlnet/`, fp32 safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with module.ema.swapped_in() if module.ema is not None else nullcontext():
        for name in TEACHER_PARTS:
            # a copy: frozen weights may be in bf16 while trained ones are fp32
            copy.deepcopy(getattr(module.denoiser, name)).float().save_pretrained(
                out / name, safe_serialization=True
            )
    return out
