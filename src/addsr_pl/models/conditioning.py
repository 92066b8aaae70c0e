"""What the UNet and ControlNet are conditioned on besides the noisy latent and the control image.

Text embeddings feed the (frozen) text cross-attention; the representation feeds SeeSR's image
cross-attention (`image_attentions`). Plain SD2 models take no representation.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addsr_pl.models.prompt_ids import PromptIds

log = logging.getLogger(__name__)


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
    `prompt_join` is how the parts are joined (see `compose`); `train_positive_prompt: false` ends
    training texts with ", " instead of the positive prompt (the official training captions).
    Embeddings of repeated texts are cached: the `cache_size` most recently used texts (0: no cache),
    so a long run over ever new tag prompts holds a bounded number of embeddings on the device.
    Texts not in the cache are encoded together, in one batched text-encoder call.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer,
        prompt: str,
        positive_prompt: str,
        negative_prompt: str,
        prompt_join: str = "clean",
        train_positive_prompt: bool = True,
        cache_size: int = 256,
    ):
        super().__init__()
        if prompt not in PROMPT_SOURCES:
            raise ValueError(f"conditioning.prompt = {prompt!r}: must be one of {PROMPT_SOURCES}")
        if prompt_join not in PROMPT_JOINS:
            raise ValueError(f"conditioning.prompt_join = {prompt_join!r}: must be one of {PROMPT_JOINS}")
        if cache_size < 0:
            raise ValueError(f"conditioning.prompt_cache_size = {cache_size}: must be >= 0 (0 turns it off)")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.positive_prompt = positive_prompt
        self.negative_prompt = negative_prompt
        self.prompt_join = prompt_join
        self.train_positive_prompt = train_positive_prompt
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, torch.dtype], Tensor] = OrderedDict()

    def compose(self, tags: str = "", manual: str = "", training: bool = False) -> str:
        """The text of one image.

        `prompt_join: clean` joins the non-empty parts with ", ": "{tags}, {manual}, {positive}".
        `official` writes them as the official pipeline does, "{tags}, {manual}," + positive, so an
        empty manual prompt leaves "{tags}, ,{positive}". Training texts without the positive prompt
        (`train_positive_prompt: false`) are the parts followed by ", " (official: "{tags}, ").
        """
        if self.prompt == "none":
            return ""
        parts = {"fixed": [], "manual": [manual], "tags": [tags, manual]}[self.prompt]
        if training and not self.train_positive_prompt:
            return "".join(p + PART_SEPARATOR for p in parts if p)
        if self.prompt_join == "official" and parts:
            return PART_SEPARATOR.join(parts) + "," + self.positive_prompt
        return PART_SEPARATOR.join(p for p in [*parts, self.positive_prompt] if p)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        """[len(texts), L, D] embeddings (the text encoder's last hidden state)."""
        device = next(self.text_encoder.parameters()).device
        dtype = next(self.text_encoder.parameters()).dtype
        found = {}
        for text in dict.fromkeys(texts):
            key = (text, str(device), dtype)
            if key in self._cache:
                self._cache.move_to_end(key)
                found[text] = self._cache[key]
        missing = [text for text in dict.fromkeys(texts) if text not in found]
        if missing:
            for text, embeds in zip(missing, self.embed(missing, device)):
                found[text] = embeds
                self._remember((text, str(device), dtype), embeds)
        return torch.stack([found[text] for text in texts])

    def embed(self, texts: list[str], device: torch.device) -> Tensor:
        """[len(texts), L, D]: the text encoder's last hidden state, in one batched call (no cache)."""
        return self.encode_ids(tokenize(self.tokenizer, texts, self.tokenizer.model_max_length, device))

    @torch.no_grad()
    def encode_ids(self, ids: Tensor) -> Tensor:
        """[B, L, D] embeddings of token ids [B, L] (no cache: the ids may never reach the host)."""
        return self.text_encoder(ids)[0]

    def _remember(self, key: tuple[str, str, torch.dtype], embeds: Tensor) -> None:
        """Keep `embeds` (a copy, not a view of a batch) and drop the least recently used beyond cache_size."""
        if self.cache_size == 0:
            return
        self._cache[key] = embeds.clone()
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()


def tokenize(tokenizer, texts: list[str], max_length: int, device: torch.device) -> Tensor:
    """Token ids of `texts`, padded and truncated to `max_length`, on `device`."""
    return tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


PROMPT_SOURCES = ("fixed", "manual", "tags", "none")
# How `compose` joins the tags, the manual prompt and the positive prompt (the official pipeline's).
PART_SEPARATOR = ", "
# inference step 1's tagger input: upscaled (the control image) | lr_bilinear (official)
TAGGER_INPUTS = ("upscaled", "lr_bilinear")
PROMPT_JOINS = ("clean", "official")
TRAIN_TAGS = ("tagger", "original_ram")


# The taggers a config or an exported student may name, by kind; a Hydra config names a kind by its
# factory's `_target_`. Nothing else is ever built from a tagger spec (a student's manifest is data).
TAGGER_TARGETS = {
    "ram": "addsr_pl.models.ram.RAMTagger.from_folder",
    "ram_random": "addsr_pl.models.ram.RAMTagger.random",
    "openclip": "addsr_pl.models.tagger.OpenCLIPTagger.from_local",
}
# Arguments of each kind that name a file or folder (resolved by the caller: see `build_tagger`).
TAGGER_PATHS = {"ram": ("folder", "dape"), "ram_random": ("weights",), "openclip": ("weights", "vocabulary")}


def tagger_kind(spec: dict) -> str:
    """The kind of a tagger spec: its `kind`, or the kind whose factory its `_target_` names."""
    if "kind" in spec:
        if not isinstance(spec["kind"], str) or spec["kind"] not in TAGGER_TARGETS or "_target_" in spec:
            raise ValueError(
                f"conditioning.tagger kind = {spec['kind']!r}: must be one of {list(TAGGER_TARGETS)} "
                "(and no _target_ beside it)"
            )
        return spec["kind"]
    target = spec.get("_target_")
    kinds = {factory: kind for kind, factory in TAGGER_TARGETS.items()}
    if not isinstance(target, str) or target not in kinds:
        raise ValueError(
            f"conditioning.tagger _target_ = {target!r}: a tagger is one of {list(TAGGER_TARGETS.values())}"
        )
    return kinds[target]


def tagger_files(kind: str, arguments: dict) -> list[tuple[str, object]]:
    """(argument, value) of each file or folder argument of a `kind` tagger that names one: set, and
    not an inline list (an OpenCLIP vocabulary may be given as its words)."""
    values = ((name, arguments.get(name)) for name in TAGGER_PATHS[kind])
    return [(name, value) for name, value in values if value is not None and not isinstance(value, list)]


def _build(kind: str, arguments: dict) -> nn.Module:
    if kind == "openclip":
        from addsr_pl.models.tagger import OpenCLIPTagger

        return OpenCLIPTagger.from_local(**arguments)
    from addsr_pl.models.ram import RAMTagger

    return RAMTagger.from_folder(**arguments) if kind == "ram" else RAMTagger.random(**arguments)


def build_tagger(spec: dict, resolve: Callable[[object, str], object] | None = None) -> nn.Module:
    """The tagger of a config's or a student's `conditioning.tagger`: its kind's factory called with the
    spec's arguments, checked against their types first (`config.TAGGER`). `resolve(value, argument)`
    turns each file or folder argument into a path (default: the value itself, a path string)."""
    from addsr_pl.config import TAGGER

    problem = TAGGER.check(spec, "conditioning.tagger")
    if problem is not None:
        raise ValueError(problem.replace("\n", "; "))
    kind = tagger_kind(spec)
    arguments = {k: v for k, v in spec.items() if k not in ("kind", "_target_")}
    if resolve is not None:
        for name, value in tagger_files(kind, arguments):
            arguments[name] = resolve(value, name)
    return _build(kind, arguments)


def prompt_options(conditioning: dict) -> dict:
    """`PromptEncoder`'s text options from a `conditioning` config group."""
    options = {
        "prompt": conditioning["prompt"],
        "positive_prompt": conditioning["positive_prompt"],
        "negative_prompt": conditioning["negative_prompt"],
        "prompt_join": conditioning.get("prompt_join", "clean"),
        "train_positive_prompt": conditioning.get("train_positive_prompt", True),
    }
    # students exported before the cache was bounded carry no size: the encoder's default
    if "prompt_cache_size" in conditioning:
        options["cache_size"] = conditioning["prompt_cache_size"]
    return options


class Conditioner(nn.Module):
    """Prompt text and representation of a batch of images in [0, 1].

    The tagger (RAM/DAPE or OpenCLIP, see `models.tagger`; None for prompts without one) supplies tags
    for `prompt: tags` and, when the models have image cross-attention (`use_representation`), the
    representation they consume. `manual_prompt` is the text of `prompt: manual` (per-image texts can be
    passed to `text_embeds` instead). `train_tagger`, if given, supplies the tags of training texts
    instead (official: the original RAM, without DAPE, see `from_config`); the representation always
    comes from `tagger`.
    """

    def __init__(
        self,
        prompt_encoder: PromptEncoder,
        tagger: nn.Module | None = None,
        use_representation: bool = False,
        manual_prompt: str = "",
        train_tagger: nn.Module | None = None,
        inference_tagger_input: str = "upscaled",
    ):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.tagger = tagger
        self.use_representation = use_representation
        self.manual_prompt = manual_prompt
        self.train_tagger = train_tagger
        if inference_tagger_input not in TAGGER_INPUTS:
            raise ValueError(
                f"conditioning.inference_tagger_input = {inference_tagger_input!r}: must be one of {TAGGER_INPUTS}"
            )
        self.inference_tagger_input = inference_tagger_input
        self._passes: dict | None = None  # see `one_pass_per_image`
        if prompt_encoder.prompt == "tags" and tagger is None:
            raise ValueError("conditioning.prompt = 'tags' needs a tagger: set conditioning.tagger")
        if use_representation and tagger is None:
            raise ValueError(
                "These models have image cross-attention (SeeSR-style) and need a representation: "
                "set conditioning.tagger (e.g. conditioning=ram)"
            )
        self.prompt_ids: PromptIds | None = None  # built at first use: training never needs it
        self._prompt_ids_built = False

    def _prompt_ids(self) -> PromptIds | None:
        """The on-device prompt ids of this conditioner, or None where prompts go through strings: a
        tagger that gives no tag mask in tag-list order (OpenCLIP's tags come by score), or a tag list,
        separator or tokenizer the table refuses (logged)."""
        if self._prompt_ids_built:
            return self.prompt_ids
        self._prompt_ids_built = True
        self.prompt_ids = self._build_prompt_ids()
        return self.prompt_ids

    def _build_prompt_ids(self) -> PromptIds | None:
        encoder = self.prompt_encoder
        if type(encoder).embed is not PromptEncoder.embed:
            return None  # several tokenizers and text encoders (SD3, SDXL): their prompts go through strings
        tags, separator = None, PART_SEPARATOR
        if encoder.prompt == "tags":
            if not hasattr(self.tagger, "tag_mask"):
                return None
            tags, separator = self.tagger.tag_list, self.tagger.tag_separator
        try:
            return PromptIds(encoder.tokenizer, encoder.compose, PART_SEPARATOR, tags, separator)
        except ValueError as error:
            log.warning("Prompts are tokenized on the host, outside the compiled sampler: %s", error)
            return None

    @property
    def device_prompts(self) -> bool:
        """Whether `condition_on_device` can build this conditioner's prompts (see `_prompt_ids`)."""
        return self._prompt_ids() is not None

    @classmethod
    def from_config(
        cls,
        text_encoder: nn.Module,
        tokenizer,
        unet: nn.Module,
        conditioning: dict,
        resolve: Callable[[object, str], object] | None = None,
    ) -> Conditioner:
        """The conditioner of a `conditioning` config group for these models: the representation is
        used exactly when the UNet has SeeSR's image cross-attention. The tagger is one of the known
        kinds (`build_tagger`; `resolve` finds its files)."""
        from addsr_pl.models.trainable import has_image_attention

        prompt_encoder = PromptEncoder(text_encoder, tokenizer, **prompt_options(conditioning))
        return cls.with_prompt_encoder(prompt_encoder, has_image_attention(unet), conditioning, resolve)

    @classmethod
    def with_prompt_encoder(
        cls,
        prompt_encoder: PromptEncoder,
        use_representation: bool,
        conditioning: dict,
        resolve: Callable[[object, str], object] | None = None,
    ) -> Conditioner:
        """The conditioner of a `conditioning` config group around a backbone's prompt encoder."""
        spec = conditioning.get("tagger")
        tagger = build_tagger(spec, resolve) if spec else None
        # train_tags: tagger (the same tags as at inference) | original_ram (that RAM without DAPE)
        train_tags = conditioning.get("train_tags", "tagger")
        if train_tags not in TRAIN_TAGS:
            raise ValueError(f"conditioning.train_tags = {train_tags!r}: must be one of {TRAIN_TAGS}")
        train_tagger = None
        if train_tags == "original_ram" and spec and spec.get("dape") is not None:
            train_tagger = build_tagger({**spec, "dape": None}, resolve)
        return cls(
            prompt_encoder,
            tagger,
            use_representation,
            conditioning.get("manual_prompt", ""),
            train_tagger,
            conditioning.get("inference_tagger_input", "upscaled"),
        )

    def first_step_image(self, lr: Tensor, lr_up: Tensor) -> Tensor:
        """What the tagger sees at inference step 1: the upscaled LR, as every later step sees its control
        image (`inference_tagger_input: upscaled`), or the native LR resized bilinearly to the tagger's
        input size (`lr_bilinear`, the official pipeline)."""
        size = getattr(self.tagger, "input_size", None)
        if self.inference_tagger_input == "upscaled" or size is None:
            return lr_up
        return F.interpolate(lr.float(), size=size, mode="bilinear", align_corners=False).clamp(0, 1)

    @contextmanager
    def one_pass_per_image(self) -> Iterator[None]:
        """Within it, a tagger runs once per images tensor: images tagged for a prompt (the same tensor
        object, unmodified) give their representation from that forward, as `condition` does at inference.
        A training iteration tags the student's and the teacher's prompt sources and then represents the
        same images; with this, RAM's image encoder runs once per distinct image batch."""
        self._passes = {}
        try:
            yield
        finally:
            self._passes = None

    @staticmethod
    def _pass_key(tagger: nn.Module, images: Tensor) -> tuple[int, int, int]:
        """One tagger's forward on one images tensor, unmodified since (`one_pass_per_image`)."""
        return (id(tagger), id(images), images._version)

    def _tagged(self, tagger: nn.Module, images: Tensor):
        """`tagger(images)`, once per (tagger, images) inside `one_pass_per_image`."""
        if self._passes is None:
            return tagger(images)
        key = self._pass_key(tagger, images)
        if key not in self._passes:  # the images are kept with the output, so their id stays theirs
            self._passes[key] = (images, tagger(images))
        return self._passes[key][1]

    def texts(self, images: Tensor, manual: list[str] | None = None, training: bool = False) -> list[str]:
        b = images.shape[0]
        tagger = self.train_tagger if training and self.train_tagger is not None else self.tagger
        tags = self._tagged(tagger, images).tags if self.prompt_encoder.prompt == "tags" else [""] * b
        manual = manual or [self.manual_prompt] * b
        return [self.prompt_encoder.compose(t, m, training) for t, m in zip(tags, manual)]

    def text_embeds(
        self,
        images: Tensor,
        blank: Tensor | None = None,
        manual: list[str] | None = None,
        training: bool = False,
    ) -> Tensor:
        """[B, L, D]; samples where `blank` is True get the empty prompt (prompt dropout); `training`
        selects the training text (`train_tagger`, `train_positive_prompt`)."""
        texts = self.texts(images, manual, training)
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

    def prompt_frame(
        self, batch: int, manual: list[str] | None = None, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """The host-side part of `condition_on_device`'s prompts: (frame, joined) of `PromptIds.frame`
        for each image's manual prompt (default: `manual_prompt`); the table moves to `device`."""
        prompt_ids = self._prompt_ids().to(device)
        return prompt_ids.frame(manual or [self.manual_prompt] * batch, device)

    def condition_on_device(self, images: Tensor | None, frame: Tensor, joined: Tensor) -> Conditioning:
        """`condition` as a function of tensors alone: the tagger's tag mask and representation from one
        pass, the prompts' token ids from the mask (`PromptIds`), the text encoder. `frame`, `joined`:
        `prompt_frame`'s; `images` may be None where neither tags nor a representation are needed."""
        mask, representation = None, None
        if self.prompt_encoder.prompt == "tags":
            mask, representation = self.tagger.tag_mask(images)
        elif self.use_representation:
            representation = self.tagger.representation(images)
        text_embeds = self.prompt_encoder.encode_ids(self.prompt_ids(mask, frame, joined))
        return Conditioning(text_embeds, representation if self.use_representation else None)

    def represent(self, images: Tensor) -> Tensor | None:
        if not self.use_representation:
            return None
        tagged = None if self._passes is None else self._passes.get(self._pass_key(self.tagger, images))
        if tagged is not None:  # these images were tagged for a prompt in this pass
            return tagged[1].representation
        return self.tagger.representation(images)
