"""The few-step student sampler with prediction-based self-refinement (PSR, paper Sec. 3.3).

`sample_student` is the one sampler of the project: the training unroll of `AddSRModule`, the
evaluation suite and the upscaling CLI all call it, so what is trained is what is run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addsr_pl.core.noise_schedule import NoiseSchedule
from addsr_pl.models.conditioning import Conditioning, Representer

# How steps after the first noise their base latent (`sample_student`'s `renoise`).
RENOISE = ("fresh", "ddim")
# How the LR becomes the first control: torch's float bicubic (`upscale`) or the official script's 8-bit PIL
# pipeline (`inference.upscaler.pil_upscale`).
LR_RESIZES = ("torch", "pil")
# How step 1's latent comes from the encoded upscaled LR: the VAE posterior's mean, or a sample (official).
START_LATENTS = ("mean", "sample")
# per_image: every noise from the image's own generator; official: the official pipeline's draw order.
NOISE_DRAWS = ("per_image", "official")


def upscale(lr: Tensor, size: tuple[int, int]) -> Tensor:
    """The LR image bicubically upscaled to the output size, in [0, 1]: the ControlNet's first control."""
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def psr_control(x0_image: Tensor, lr_up: Tensor, psr_weight: float) -> Tensor:
    """The next step's control image: the decoded prediction blended with the upscaled LR."""
    return psr_weight * x0_image + (1 - psr_weight) * lr_up


class Denoiser(nn.Module):
    """UNet + ControlNet predicting epsilon (or v, x0) from (z_t, t, control image in [0, 1], conditioning);
    t is the network's timestep (`NoiseSchedule.model_timestep`).

    SeeSR-style models (config flag `use_image_cross_attention`) also receive the representation
    as `image_encoder_hidden_states`.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.conditioning_scale = conditioning_scale

    def networks(self) -> dict[str, nn.Module]:
        """The networks by component name (a student folder's subfolders)."""
        return {"unet": self.unet, "controlnet": self.controlnet}

    @property
    def downsampling(self) -> int:
        """Latent cells per cell of the UNet's coarsest level: latent sizes must be multiples of it."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def forward(self, z_t: Tensor, t: Tensor, control_image: Tensor, conditioning: Conditioning) -> Tensor:
        # the noisy latent is kept in fp32 (Eq. 1); the networks take it in their input layer's dtype
        z_t = z_t.to(self.unet.conv_in.weight.dtype)
        extra = {}
        if conditioning.image_embeds is not None:
            extra["image_encoder_hidden_states"] = conditioning.image_embeds.to(z_t.dtype)
        down, mid = self.controlnet(
            z_t,
            t,
            encoder_hidden_states=conditioning.text_embeds,
            controlnet_cond=control_image.to(z_t.dtype),
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
            **extra,
        )[:2]
        return self.unet(
            z_t,
            t,
            encoder_hidden_states=conditioning.text_embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **extra,
        )[0]


@dataclass
class StudentStep:
    """One student step: what went in (z_t, t, control image) and what came out (the UNet's
    prediction, x0)."""

    timestep: Tensor  # [B], the schedule's
    control_image: Tensor  # [B, 3, H, W] in [0, 1]: what the ControlNet saw
    z_t: Tensor
    prediction: Tensor  # eps, v, x0 or the flow velocity, as the schedule's prediction_type says
    x0_latent: Tensor  # Eq. 4 (or its v, flow form)
    x0_image: Tensor | None  # decoded and clamped to [0, 1]; None where nothing needed it


def sample_student(
    denoiser: nn.Module,
    codec,
    *,
    lr_up: Tensor,
    text_embeds: Tensor,
    represent: Representer,
    timesteps: Tensor,
    noises: list[Tensor],
    noise_schedule: NoiseSchedule,
    start_latent: Tensor,
    psr: bool,
    psr_weight: float,
    reference_latent: Tensor | None = None,
    grad_last: bool = False,
    decode_last: bool = True,
    first_representation: Tensor | None = None,
    psr_decoder=None,
    renoise: str = "fresh",
) -> list[StudentStep]:
    """Run len(timesteps) student steps.

    Args:
        lr_up: the LR image upscaled to the output size, in [0, 1]; the control image of step 1, and of
            every step when `psr` is off.
        timesteps: [k] (shared) or [B, k] (per sample), the schedule's, strictly decreasing along k.
        noises: k noise tensors shaped like the latent: step 1 noises `start_latent`, step i > 1
            re-noises its base latent (see `reference_latent`).
        start_latent: the latent noised for step 1 (the encoded upscaled LR at inference; the encoded
            HR in ADD-style training).
        psr: prediction-based self-refinement: step i > 1 is controlled by the decoded x0 of step i - 1,
            blended with `lr_up` by `psr_weight` (1 = the prediction alone); the representation is
            recomputed from that control image, the text embeddings are kept.
        reference_latent: if given, step i > 1 noises this latent instead of the previous x0 (the
            official training noises the HR latent at every step); None re-noises the prediction, as
            at inference.
        grad_last: build the autograd graph for the last step only; earlier steps never have one.
        decode_last: decode the last step's x0 to an image.
        first_representation: the representation of `lr_up` when the caller already has it (the
            tagger computed it with the prompt's tags in the same forward); None computes it.
        psr_decoder: what decodes the intermediate x0s that only feed the next step's control image
            (anything with `decode(latents) -> [0, 1] image`, e.g. a small distilled decoder); None:
            `codec`. The last step's image always comes from `codec`.
        noise_schedule: how latents are noised and x0 predicted (`core.noise_schedule`): it knows what
            the denoiser predicts and which timestep it is fed.
        renoise: how step i > 1 noises its base latent. `fresh` (ADD's sampler, the student's): with
            `noises[i]`. `ddim`: with the noise the previous step's prediction implies
            (`NoiseSchedule.implied_noise`), which makes the steps DDIM's
            deterministic (eta = 0) sampler, the usual way to sample a diffusion teacher with many steps;
            `noises[i]` for i > 0 are then unused.
    """
    if renoise not in RENOISE:
        raise ValueError(f"renoise = {renoise!r}: must be one of {', '.join(RENOISE)}")
    batch = start_latent.shape[0]
    if timesteps.ndim == 1:
        timesteps = timesteps.unsqueeze(0).expand(batch, -1)
    timesteps = timesteps.to(start_latent.device)
    k = timesteps.shape[1]
    if len(noises) != k:
        raise ValueError(f"sample_student needs one noise tensor per step: got {len(noises)} for {k} steps")

    steps: list[StudentStep] = []
    z_t = noise_schedule.add_noise(start_latent, noises[0], timesteps[:, 0])
    control = lr_up
    for i in range(k):
        last = i == k - 1
        t = timesteps[:, i]
        with torch.set_grad_enabled(grad_last and last):
            representation = first_representation if i == 0 and first_representation is not None else None
            conditioning = Conditioning(
                text_embeds, represent(control) if representation is None else representation
            )
            prediction = denoiser(z_t, noise_schedule.model_timestep(t), control, conditioning)
            x0_latent = noise_schedule.predict_x0(z_t, prediction, t)
            decoder = codec if last or psr_decoder is None else psr_decoder
            needs_image = (psr and not last) or (last and decode_last)
            x0_image = decoder.decode(x0_latent).clamp(0, 1) if needs_image else None
        steps.append(StudentStep(t, control, z_t, prediction, x0_latent, x0_image))
        if last:
            break
        if psr:
            control = psr_control(x0_image, lr_up, psr_weight)
        base = x0_latent if reference_latent is None else reference_latent
        noise = noises[i + 1] if renoise == "fresh" else noise_schedule.implied_noise(z_t, prediction, t)
        z_t = noise_schedule.add_noise(base, noise.detach(), timesteps[:, i + 1])
    return steps
