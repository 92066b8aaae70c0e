"""The PSR decoder stage (`stage=psr_decoder`): distil a small decoder from the project's VAE.

PSR decodes every intermediate x0 only to build the next step's control image; a small decoder
(`models.psr_decoder.PsrDecoder`, TAESD's layout) does that for a fraction of the VAE decoder's
FLOPs. Public TAESD weights load as they are; this stage trains one for any VAE: on the training
images, the target of the small decoder is the VAE's own decode of the same latents, so it learns
the VAE decoder, not the data. Latents come from the HR crops and from the upscaled LRs (what the
student's early predictions look like), each optionally jittered by Gaussian noise so the decoder
also sees latents a little off the encoder's range.

Export: `<run dir>/psr_decoder/` (config.json + diffusion_pytorch_model.safetensors); with
`student_dir` set, also copied into that student folder and named in its manifest, so
`addsr-pl upscale` uses it for PSR's intermediate steps (`psr_decoder: tiny`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor

from addsr_pl.core.sampler import upscale
from addsr_pl.core.student_format import MANIFEST, class_name
from addsr_pl.method.checkpointing import TrainedStateCheckpoint
from addsr_pl.models.psr_decoder import PsrDecoder, build_tiny_autoencoder
from addsr_pl.models.vae import VaeCodec

PSR_DECODER = "psr_decoder"
LOSSES = ("l1", "mse")


class PsrDecoderModule(TrainedStateCheckpoint, pl.LightningModule):
    """Trains `PsrDecoder` to reproduce the frozen VAE decoder (`method`: conf/method/psr_decoder.yaml)."""

    def __init__(self, model: dict, conditioning: dict, method: dict, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold the small decoder only
        self.method = method
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            components = instantiate(model["components"], _convert_="all")
            self.codec = VaeCodec(components.vae).requires_grad_(False).eval()
            a = method["architecture"]
            autoencoder = build_tiny_autoencoder(
                self.codec.scale_factor,
                self.codec.latent_channels,
                a["channels"],
                a["blocks_per_stage"],
            )
        # The encoder half stays untrained (PSR only decodes); the folder keeps TAESD's layout.
        autoencoder.encoder.requires_grad_(False)
        self.decoder = PsrDecoder(autoencoder)
        self.micro_step = 0

    def train(self, mode: bool = True) -> PsrDecoderModule:
        super().train(mode)
        self.codec.eval()
        return self

    @torch.no_grad()
    def latents_and_targets(self, batch: dict) -> tuple[Tensor, Tensor]:
        hr, lr = batch["hr"], batch["lr"]
        images = [hr]
        if self.method["include_lr"]:
            images.append(upscale(lr, tuple(hr.shape[-2:])))
        latents = self.codec.encode(torch.cat(images)).float()
        jitter = self.method["latent_jitter"]
        if jitter:
            g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.micro_step)
            latents = latents + jitter * torch.randn(
                latents.shape, generator=g, device=latents.device, dtype=latents.dtype
            )
        return latents, self.codec.decode(latents)

    def distillation_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        loss = self.method["loss"]
        return F.l1_loss(prediction, target) if loss == "l1" else F.mse_loss(prediction, target)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        latents, target = self.latents_and_targets(batch)
        loss = self.distillation_loss(self.decoder.decode(latents), target)
        self.micro_step += 1
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """PSNR of the small decoder against the VAE decoder on the same latents."""
        latents, target = self.latents_and_targets(batch)
        mse = (self.decoder.decode(latents).clamp(0, 1) - target.clamp(0, 1)).pow(2).flatten(1).mean(1)
        self.log("val/psnr_vs_vae", (-10 * torch.log10(mse.clamp_min(1e-10))).mean(), sync_dist=True)

    def configure_optimizers(self):
        parameters = [p for p in self.decoder.parameters() if p.requires_grad]
        # plain containers in the optimizer state: checkpoints stay readable to a weights-only load
        optimizer = instantiate(self.method["optimizer"], params=parameters, _convert_="all")
        scheduler = instantiate(self.method["lr_scheduler"], optimizer=optimizer, _convert_="all")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trained_state_keys(self) -> set[str]:
        return {f"decoder.{n}" for n, _ in self.decoder.named_parameters()}


def export_psr_decoder(module: PsrDecoderModule, out_dir: str | Path, student_dir: str | Path | None) -> Path:
    """Write the small decoder to `out_dir/psr_decoder/`; with a student folder, copy it in there too and
    name it in the student's manifest (component `psr_decoder`)."""
    folder = Path(out_dir) / PSR_DECODER
    autoencoder = module.decoder.autoencoder
    autoencoder.float().save_pretrained(folder, safe_serialization=True)
    if student_dir is not None:
        student = Path(student_dir).expanduser()
        manifest_file = student / MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(
                f"student_dir = {student}: no {MANIFEST} there; point it at an exported student folder"
            )
        shutil.copytree(folder, student / PSR_DECODER, dirs_exist_ok=True)
        manifest = json.loads(manifest_file.read_text())
        manifest["components"][PSR_DECODER] = {"class": class_name(autoencoder), "path": PSR_DECODER}
        manifest_file.write_text(json.dumps(manifest, indent=2))
    return folder
