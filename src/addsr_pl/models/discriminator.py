"""The projected multi-level ViT discriminator of AddSR (StyleGAN-T lineage).

A frozen DINO ViT-S/16 reads the image; trainable heads on several of its layers score each token,
projection-conditioned on a frozen DINOv2 ViT-S/14 embedding of the LR image. Heads keep the official
module names (`heads.{0..3}` for the hooked blocks, `heads.4` for the patch embedding) and spectral-norm
parameter layout.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from addsr_pl.models.diffusion import require_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_timm_weights(model: nn.Module, path: str | None, key: str) -> None:
    """Load a local ViT checkpoint (DINO / DINOv2 release layout) into a timm model."""
    if not path:
        return
    file = require_file(path, "discriminator ViT weights", key)
    state = torch.load(file, map_location="cpu", weights_only=True)
    for wrapper in ("model", "teacher", "state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = timm.models.vision_transformer.checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise RuntimeError(
            f"{file} does not fit the configured ViT ({key}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _frozen_vit(spec: dict, weights: str | None, key: str) -> nn.Module:
    spec = dict(spec)
    model = timm.create_model(spec.pop("name"), pretrained=False, num_classes=0, **spec)
    _load_timm_weights(model, weights, key)
    return model.requires_grad_(False).eval()


class EqualizedLinear(nn.Linear):
    """A linear layer whose weights are stored N(0, 1) and scaled by 1/sqrt(in_features) at run time
    (StyleGAN's equalized learning rate): under Adam each step moves the effective weights
    sqrt(in_features) times less than a plain `nn.Linear` with the same learning rate."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.gain = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight.normal_()
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.gain, self.bias)


class DiscHead(nn.Module):
    """Per-token logits of one feature level, projected onto an embedding of the condition.

    `cmapper_equalized` makes the condition's projection an `EqualizedLinear` (official), else an
    `nn.Linear`; the state-dict keys are the same.
    """

    def __init__(
        self,
        channels: int,
        c_dim: int,
        cmap_dim: int,
        groups: int,
        kernel_size: int,
        slope: float,
        cmapper_equalized: bool = True,
    ):
        super().__init__()

        def block(k: int) -> nn.Sequential:
            conv = nn.Conv1d(channels, channels, k, padding=k // 2, padding_mode="circular")
            return nn.Sequential(spectral_norm(conv), nn.GroupNorm(groups, channels), nn.LeakyReLU(slope))

        self.main = nn.Sequential(block(1), _Residual(block(kernel_size)))
        self.cmapper = EqualizedLinear(c_dim, cmap_dim) if cmapper_equalized else nn.Linear(c_dim, cmap_dim)
        self.cls = spectral_norm(nn.Conv1d(channels, cmap_dim, 1))
        self.cmap_dim = cmap_dim

    def forward(self, features: Tensor, c: Tensor) -> Tensor:
        h = self.cls(self.main(features))  # [B, cmap_dim, N]
        cmap = self.cmapper(c).unsqueeze(-1)
        return (h * cmap).sum(1) / math.sqrt(self.cmap_dim)  # [B, N]


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


def diff_augment(x: Tensor, translation: float, cutout: float, generator: torch.Generator) -> Tensor:
    """DiffAugment's `translation,cutout` policy with per-sample draws, on images in [-1, 1]."""
    b, _, h, w = x.shape
    dev = x.device
    if translation > 0:
        sh, sw = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=dev, generator=generator)
        dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=dev, generator=generator)
        ys = (torch.arange(h, device=dev).view(1, h, 1) + dy + 1).expand(b, h, w)
        xs = (torch.arange(w, device=dev).view(1, 1, w) + dx + 1).expand(b, h, w)
        padded = F.pad(x, (1, 1, 1, 1))  # zero border: shifted-in pixels read it
        ys = ys.clamp(0, h + 1)
        xs = xs.clamp(0, w + 1)
        flat = padded.flatten(2)
        index = (ys * (w + 2) + xs).flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1)
        x = flat.gather(2, index).view_as(x)
    if cutout > 0:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=dev, generator=generator)
        cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=dev, generator=generator)
        yy = torch.arange(h, device=dev).view(1, h, 1)
        xx = torch.arange(w, device=dev).view(1, 1, w)
        top, left = cy - ch // 2, cx - cw // 2
        inside = (yy >= top) & (yy < top + ch) & (xx >= left) & (xx < left + cw)
        x = x * (~inside).unsqueeze(1).to(x.dtype)
    return x


class ProjectedDiscriminator(nn.Module):
    """D(x, c): per-token logits of images x in [0, 1], conditioned on c from the LR image.

    Args:
        backbone: timm kwargs of the feature ViT (`name` plus overrides), DINO ViT-S/16 by default.
        backbone_weights: local DINO checkpoint (`dino_deitsmall16_pretrain.pth`); None: random (tests).
        hook_blocks: blocks whose (pre-norm) tokens feed heads 0..n-1; the patch embedding feeds head n.
        conditioner: timm kwargs of the condition ViT, DINOv2 ViT-S/14 by default.
        conditioner_weights: local DINOv2 checkpoint (`dinov2_vits14_pretrain.pth`); None: random.
        conditioner_image_size: the LR image is resized (bilinear) to this size, no normalisation.
        image_size: the backbone's input size; each image is randomly cropped to it with `crop_prob`
            (when larger), otherwise area-resized.
        cmapper_equalized: the heads' condition projection with a run-time gain of 1/sqrt(c_dim)
            (`EqualizedLinear`, official) or a plain `nn.Linear`.
    """

    def __init__(
        self,
        backbone: dict,
        backbone_weights: str | None,
        hook_blocks: list[int],
        conditioner: dict,
        conditioner_weights: str | None,
        conditioner_image_size: int,
        image_size: int,
        crop_prob: float,
        translation: float,
        cutout: float,
        cmap_dim: int,
        head_groups: int,
        head_kernel_size: int,
        leaky_slope: float,
        cmapper_equalized: bool = True,
    ):
        super().__init__()
        self.backbone = _frozen_vit(backbone, backbone_weights, "model.discriminator.backbone_weights")
        self.conditioner = _frozen_vit(
            conditioner, conditioner_weights, "model.discriminator.conditioner_weights"
        )
        self.hook_blocks = list(hook_blocks)
        if max(self.hook_blocks) >= len(self.backbone.blocks):
            raise ValueError(
                f"model.discriminator.hook_blocks = {self.hook_blocks}: the backbone has "
                f"{len(self.backbone.blocks)} blocks"
            )
        channels = self.backbone.embed_dim
        c_dim = self.conditioner.embed_dim
        self.heads = nn.ModuleDict(
            {
                str(i): DiscHead(
                    channels, c_dim, cmap_dim, head_groups, head_kernel_size, leaky_slope, cmapper_equalized
                )
                for i in range(len(self.hook_blocks) + 1)
            }
        )
        self.conditioner_image_size = conditioner_image_size
        self.image_size = image_size
        self.crop_prob = crop_prob
        self.translation = translation
        self.cutout = cutout
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ProjectedDiscriminator:
        super().train(mode)
        self.backbone.eval()
        self.conditioner.eval()
        return self

    @torch.no_grad()
    def condition(self, lr_up: Tensor) -> Tensor:
        """c: the DINOv2 CLS token (after the final norm) of the upscaled LR image in [0, 1]."""
        size = (self.conditioner_image_size, self.conditioner_image_size)
        x = F.interpolate(lr_up.float(), size=size, mode="bilinear", align_corners=False)
        dtype = next(self.conditioner.parameters()).dtype
        return self.conditioner.forward_features(x.to(dtype))[:, 0].float()

    def _prepare(self, images: Tensor, generator: torch.Generator) -> Tensor:
        x = diff_augment(images.float() * 2 - 1, self.translation, self.cutout, generator)
        x = (x + 1) / 2
        size = self.image_size
        resized = F.interpolate(x, size=(size, size), mode="area")
        if x.shape[-1] > size and x.shape[-2] > size:
            # Per sample: a random size x size crop with crop_prob, else the area-resized image. Both
            # are computed and selected on the device, so no random draw waits for the host.
            b, dev = x.shape[0], x.device
            crop = torch.rand(b, device=dev, generator=generator) < self.crop_prob
            top = torch.randint(0, x.shape[-2] - size + 1, (b, 1, 1), device=dev, generator=generator)
            left = torch.randint(0, x.shape[-1] - size + 1, (b, 1, 1), device=dev, generator=generator)
            offsets = torch.arange(size, device=dev)
            rows = (top + offsets.view(1, size, 1)).expand(b, size, size)
            cols = (left + offsets.view(1, 1, size)).expand(b, size, size)
            cropped = x[torch.arange(b, device=dev).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
            x = torch.where(crop.view(b, 1, 1, 1), cropped, resized)
        else:
            x = resized
        return (x - self.mean) / self.std

    def features(self, x: Tensor) -> list[Tensor]:
        """Token features [B, C, N] of each hooked block, then of the patch embedding (CLS added)."""
        vit = self.backbone
        dtype = next(vit.parameters()).dtype
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x.to(dtype))))

        def readout(t: Tensor) -> Tensor:  # patch tokens + CLS, channels first
            return (t[:, 1:] + t[:, :1]).transpose(1, 2).float()

        embedding = readout(tokens)
        feats = []
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i in self.hook_blocks:
                feats.append(readout(tokens))
            if i == max(self.hook_blocks):
                break
        return [*feats, embedding]

    def forward(self, images: Tensor, c: Tensor, generator: torch.Generator) -> Tensor:
        """Logits [B, sum of token counts] of images in [0, 1]."""
        feats = self.features(self._prepare(images, generator))
        return torch.cat([self.heads[str(i)](f, c) for i, f in enumerate(feats)], dim=1)

    def trainable_state_keys(self) -> list[str]:
        return [f"heads.{k}" for k in self.heads.state_dict()]
