"""What the UNet and ControlNet are conditioned on besides the noisy latent and the control image.

Text embeddings feed the (frozen) text cross-attention; the representation feeds SeeSR's image
cross-attention (`image_attentions`). Plain SD2 models take no representation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Conditioning:
    """Cross-attention inputs of one batch: `text_embeds` [B, L, D] and `image_embeds` [B, N, D'] or None."""

    text_embeds: Tensor
    image_embeds: Tensor | None = None

    def repeat(self, n: int) -> Conditioning:
        """Each sample repeated n times along the batch (sample-major), as for several teacher timesteps."""
        image = None if self.image_embeds is None else self.image_embeds.repeat_interleave(n, dim=0)
        return Conditioning(self.text_embeds.repeat_interleave(n, dim=0), image)

    def to(self, dtype: torch.dtype) -> Conditioning:
        image = None if self.image_embeds is None else self.image_embeds.to(dtype)
        return Conditioning(self.text_embeds.to(dtype), image)


# images in [0, 1] -> representation [B, N, D'] (or None for models without image cross-attention)
Representer = Callable[[Tensor], Tensor | None]


def no_representation(images: Tensor) -> None:
    """The representer of plain SD2 models: they have no image cross-attention."""
    return None


class PromptEncoder(nn.Module):
    """Text embeddings for the UNet/ControlNet cross-attention, from the frozen SD text encoder.

    `prompt` selects the text: `fixed` (the positive prompt alone), `manual` (a caller-given text,
    e.g. the paper's Sec. 4.4 manual prompts, followed by the positive prompt), `tags` (tagger tags,
    then the positive prompt, as the official pipeline builds it) or `none` (the empty prompt).
    Embeddings of repeated texts are cached.
    """

    def __init__(
        self, text_encoder: nn.Module, tokenizer, prompt: str, positive_prompt: str, negative_prompt: str
    ):
        super().__init__()
        if prompt not in PROMPT_SOURCES:
            raise ValueError(f"conditioning.prompt = {prompt!r}: must be one of {PROMPT_SOURCES}")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.positive_prompt = positive_prompt
        self.negative_prompt = negative_prompt
        self._cache: dict[tuple[str, str, torch.dtype], Tensor] = {}

    def compose(self, tags: str = "", manual: str = "") -> str:
        """The text of one image, as the official pipeline joins it: "{tags}, {manual}, {positive}"."""
        if self.prompt == "none":
            return ""
        parts = {"fixed": [], "manual": [manual], "tags": [tags, manual]}[self.prompt]
        return ", ".join(p for p in [*parts, self.positive_prompt] if p)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        """[len(texts), L, D] embeddings (the text encoder's last hidden state)."""
        device = next(self.text_encoder.parameters()).device
        dtype = next(self.text_encoder.parameters()).dtype
        out = []
        for text in texts:
            key = (text, str(device), dtype)
            if key not in self._cache:
                ids = self.tokenizer(
                    [text],
                    padding="max_length",
                    max_length=self.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                self._cache[key] = self.text_encoder(ids)[0][0]
            out.append(self._cache[key])
        return torch.stack(out)

    def clear_cache(self) -> None:
        self._cache.clear()


PROMPT_SOURCES = ("fixed", "manual", "tags", "none")


class Conditioner(nn.Module):
    """Prompt text and representation of a batch of images in [0, 1].

    The tagger (RAM/DAPE or OpenCLIP, see `models.tagger`; None for prompts without one) supplies tags
    for `prompt: tags` and, when the models have image cross-attention (`use_representation`), the
    representation they consume. `manual_prompt` is the text of `prompt: manual` (per-image texts can be
    passed to `text_embeds` instead).
    """

    def __init__(
        self,
        prompt_encoder: PromptEncoder,
        tagger: nn.Module | None = None,
        use_representation: bool = False,
        manual_prompt: str = "",
    ):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.tagger = tagger
        self.use_representation = use_representation
        self.manual_prompt = manual_prompt
        if prompt_encoder.prompt == "tags" and tagger is None:
            raise ValueError("conditioning.prompt = 'tags' needs a tagger: set conditioning.tagger")
        if use_representation and tagger is None:
            raise ValueError(
                "These models have image cross-attention (SeeSR-style) and need a representation: "
                "set conditioning.tagger (e.g. conditioning=ram)"
            )

    @classmethod
    def from_config(
        cls, text_encoder: nn.Module, tokenizer, unet: nn.Module, conditioning: dict
    ) -> Conditioner:
        """The conditioner of a `conditioning` config group for these models: the representation is
        used exactly when the UNet has SeeSR's image cross-attention."""
        from hydra.utils import instantiate

        from addsr_pl.models.trainable import has_image_attention

        tagger = instantiate(conditioning["tagger"], _convert_="all") if conditioning.get("tagger") else None
        prompt_encoder = PromptEncoder(
            text_encoder,
            tokenizer,
            conditioning["prompt"],
            conditioning["positive_prompt"],
            conditioning["negative_prompt"],
        )
        return cls(prompt_encoder, tagger, has_image_attention(unet), conditioning.get("manual_prompt", ""))

    def texts(self, images: Tensor, manual: list[str] | None = None) -> list[str]:
        b = images.shape[0]
        tags = self.tagger(images).tags if self.prompt_encoder.prompt == "tags" else [""] * b
        manual = manual or [self.manual_prompt] * b
        return [self.prompt_encoder.compose(t, m) for t, m in zip(tags, manual)]

    def text_embeds(
        self, images: Tensor, blank: Tensor | None = None, manual: list[str] | None = None
    ) -> Tensor:
        """[B, L, D]; samples where `blank` is True get the empty prompt (prompt dropout)."""
        texts = self.texts(images, manual)
        if blank is not None:
            texts = ["" if drop else text for text, drop in zip(texts, blank.tolist())]
        return self.prompt_encoder.encode(texts)

    def condition(self, images: Tensor, manual: list[str] | None = None) -> Conditioning:
        """Text embeddings and representation of the same images from one tagger forward.

        The tagger's image encoder yields both the tags (for `prompt: tags`) and the representation,
        so an inference step 1 needs one pass where `text_embeds` then `represent` would take two.
        """
        b = images.shape[0]
        tags, representation = [""] * b, None
        if self.prompt_encoder.prompt == "tags":
            output = self.tagger(images)
            tags, representation = output.tags, output.representation
        elif self.use_representation:
            representation = self.tagger.representation(images)
        manual = manual or [self.manual_prompt] * b
        text_embeds = self.prompt_encoder.encode(
            [self.prompt_encoder.compose(t, m) for t, m in zip(tags, manual)]
        )
        return Conditioning(text_embeds, representation if self.use_representation else None)

    def represent(self, images: Tensor) -> Tensor | None:
        if not self.use_representation:
            return None
        return self.tagger.representation(images)
