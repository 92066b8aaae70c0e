"""Taggers: images in [0, 1] -> tag prompts and the representation SeeSR's image cross-attention consumes.

Two implementations share the `Tagger` interface:

- `addsr_pl.models.ram.RAMTagger`: RAM (Swin-L 14M), optionally with SeeSR's DAPE merged in, the
  official teacher's tagger; its representation is RAM's `image_proj(visual_encoder(x))` [B, 145, 512].
- `OpenCLIPTagger` (here): zero-shot tags over a vocabulary from a local OpenCLIP model, for users
  who train their own teacher on a representation of their choice.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TaggerOutput:
    """`tags`: one string per image (the tags joined by the tagger's separator); `representation`: [B, N, D] or None."""

    tags: list[str]
    representation: Tensor | None


@runtime_checkable
class Tagger(Protocol):
    """Images [B, 3, H, W] in [0, 1] -> TaggerOutput. `representation` alone is a `Representer`."""

    def __call__(self, images: Tensor) -> TaggerOutput: ...

    def representation(self, images: Tensor) -> Tensor | None: ...


class OpenCLIPTagger(nn.Module):
    """Zero-shot tags and image-token representations from an OpenCLIP model (frozen).

    Tags: the vocabulary words whose image-text cosine similarity, scaled by the model's logit scale
    and passed through a sigmoid, exceeds `threshold`, keeping at most `top_k` (highest first); the
    vocabulary's text embeddings are computed once at construction.

    Representation: the vision tower's output tokens (class token + patch tokens, after its final
    LayerNorm) [B, 1 + P, width], mapped to `representation_dim` by `representation_proj`, a
    *fixed random orthogonal* linear map (seeded by `projection_seed`). Fixed, because this
    representation is an input of a teacher trained afterwards: the teacher's image attentions
    (their `to_k`/`to_v`) learn whatever linear read-out they need, so a trainable projection here
    would only add a second, redundant linear layer; orthogonal, because it keeps distances between
    tokens (no feature is scaled away) and is reproducible from the seed alone.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        vocabulary: Sequence[str],
        *,
        representation_dim: int,
        threshold: float,
        top_k: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        interpolation: str,
        antialias: bool,
        projection_seed: int,
        tag_separator: str,
        dtype: torch.dtype | str = torch.float32,
    ):
        super().__init__()
        dtype = resolve_dtype(dtype)
        if not vocabulary:
            raise ValueError("OpenCLIPTagger needs a non-empty vocabulary (a list of words)")
        if top_k < 1:
            raise ValueError(f"OpenCLIPTagger top_k must be >= 1, got {top_k}")
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.vocabulary = list(vocabulary)
        self.threshold = threshold
        self.top_k = top_k
        self.tag_separator = tag_separator
        self.interpolation = interpolation
        self.antialias = antialias
        self.dtype = dtype
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            text = self.model.encode_text(tokenizer(self.vocabulary))
        self.register_buffer("text_features", F.normalize(text.float(), dim=-1), persistent=False)
        width = _vision_width(self.model)
        generator = torch.Generator().manual_seed(projection_seed)
        # QR of a Gaussian matrix gives orthonormal columns (rows when projecting down).
        q, _ = torch.linalg.qr(
            torch.randn(max(width, representation_dim), min(width, representation_dim), generator=generator)
        )
        weight = q if representation_dim >= width else q.T
        self.representation_proj = nn.Linear(width, representation_dim, bias=False).requires_grad_(False)
        self.representation_proj.weight.data.copy_(weight)

    @classmethod
    def from_local(
        cls,
        model_name: str,
        weights: str | Path,
        vocabulary: Sequence[str] | str | Path,
        model_config: dict | None = None,
        **kwargs,
    ) -> OpenCLIPTagger:
        """An OpenCLIP architecture with weights from a local file (never a download).

        The architecture is OpenCLIP's registered `model_name`, or `model_config` (the keyword
        arguments of `open_clip.CLIP`: embed_dim, vision_cfg, text_cfg) for a custom one, which then
        uses OpenCLIP's bundled BPE tokenizer at the config's context length.
        `vocabulary` is a list of words or a text file with one word per line.
        """
        import open_clip

        words = read_vocabulary(vocabulary)
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(
                f"Missing OpenCLIP weights: expected {weights}. Download the checkpoint for {model_name} "
                "once and point `weights` at the local file."
            )
        if ":" in model_name:  # `hf-hub:` / `local-dir:` schemas would fetch or read another model
            raise ValueError(
                f"OpenCLIP model_name = {model_name!r}: give a registered architecture name (e.g. ViT-B-16)"
            )
        # weights_only: the checkpoint's pickle may build tensors only, never run code
        if model_config is None:
            model = open_clip.create_model(model_name, pretrained=str(weights), weights_only=True)
            tokenizer = open_clip.get_tokenizer(model_name)
        else:
            model = open_clip.CLIP(**model_config)
            open_clip.load_checkpoint(model, str(weights), weights_only=True)
            tokenizer = open_clip.SimpleTokenizer(context_length=model_config["text_cfg"]["context_length"])
        return cls(model, tokenizer, words, **kwargs)

    def _pixels(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=self.image_size, mode="bicubic", align_corners=False).clamp(
            0, 1
        )
        return ((x - self.image_mean) / self.image_std).to(self.dtype)

    @torch.no_grad()
    def forward(self, images: Tensor) -> TaggerOutput:
        pooled, tokens = _encode_image_tokens(self.model, self._pixels(images))
        return TaggerOutput(self._tags(pooled), self.representation_proj(tokens.float()))

    @torch.no_grad()
    def representation(self, images: Tensor) -> Tensor:
        _, tokens = _encode_image_tokens(self.model, self._pixels(images))
        return self.representation_proj(tokens.float())

    def tag_probabilities(self, pooled: Tensor) -> Tensor:
        """sigmoid(logit_scale * cosine(image, word)) per vocabulary word, [B, V]."""
        image = F.normalize(pooled.float(), dim=-1)
        return torch.sigmoid(self.model.logit_scale.exp().float() * image @ self.text_features.T)

    def _tags(self, pooled: Tensor) -> list[str]:
        probabilities = self.tag_probabilities(pooled)
        k = min(self.top_k, probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        values, indices = values.cpu(), indices.cpu()  # to the host at once, not row by row
        return [
            self.tag_separator.join(
                self.vocabulary[i] for v, i in zip(row_v.tolist(), row_i.tolist()) if v > self.threshold
            )
            for row_v, row_i in zip(values, indices)
        ]


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name in a config ("bfloat16", "float32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16'")
    return resolved


def read_vocabulary(vocabulary: Sequence[str] | str | Path) -> list[str]:
    if isinstance(vocabulary, (str, Path)):
        path = Path(vocabulary)
        if not path.is_file():
            raise FileNotFoundError(f"Missing vocabulary file: expected {path} (one word per line).")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(vocabulary)


def _vision_width(model: nn.Module) -> int:
    return model.visual.ln_post.normalized_shape[0]


def _encode_image_tokens(model: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled image embedding [B, E]; class + patch tokens of the last block after ln_post [B, 1 + P, width])."""
    visual = model.visual
    if not hasattr(visual, "forward_intermediates"):
        raise TypeError(
            f"OpenCLIPTagger needs an OpenCLIP VisionTransformer tower, got {type(visual).__name__}"
        )
    out = visual.forward_intermediates(
        pixels, indices=1, normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True
    )
    tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
    return out["image_features"], tokens
