"""RAM (Recognize Anything, Swin-L 14M) and SeeSR's DAPE, in the layout of the official checkpoint.

SeeSR and AddSR condition their UNet/ControlNet on RAM: the tags of the LR image become the text
prompt, and `image_proj(visual_encoder(x))` [B, 145, 512] feeds the image cross-attention. DAPE is
SeeSR's LoRA fine-tune of RAM for degraded inputs; here it is merged into the weights once
(W += B A * lora_alpha / r), so no LoRA runs at inference.

Parts (module names are the checkpoint's):
- `visual_encoder`: Swin Transformer in the Microsoft / old-timm layout (patch merging at the *end*
  of every stage but the last); output = final LayerNorm tokens with their mean prepended.
- `image_proj`: Linear vision width -> representation width (512).
- `label_embed` [classes, 512], `wordvec_proj` (512 -> head width): one query per tag.
- `tagging_head`: RAM's two-layer BERT decoder with cross-attention only (self-attention and
  embeddings removed, as Query2Label), post-LayerNorm; then `fc` -> one logit per tag.

The checkpoint's `tag_encoder` and `text_decoder` (captioning parts) are not built; the loader
reports how many of their keys it skipped. The relative-position indices and shift masks are
computed here, not loaded.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addsr_pl.core.precision import autocast_off
from addsr_pl.models.tagger import TaggerOutput, resolve_dtype

logger = logging.getLogger(__name__)

# Parts of the RAM checkpoint that tagging does not use (Tag2Text-style captioning).
UNUSED_CHECKPOINT_PARTS = ("tag_encoder.", "text_decoder.")
# Buffers the official model saves but this one recomputes from the window geometry.
RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")


def relative_position_index(window: int) -> Tensor:
    """[N, N] index into the ((2w - 1)^2, heads) bias table for every pair of tokens in a w x w window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B, nW, w*w, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of window_partition: [B, nW, w*w, C] -> [B, H, W, C]."""
    b, _, _, c = windows.shape
    x = windows.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> Tensor:
    """[nW, N, N] additive mask: tokens of a shifted window that came from different image regions
    (after the cyclic shift) must not attend to each other."""
    region = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
        region[:, rows, cols, :] = label
    labels = window_partition(region, window).squeeze(-1).squeeze(0)  # [nW, N]
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, float("-inf"))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x [B, nW, N, C]; mask [nW, N, N] or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b * nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B * nW, heads, N, d]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)  # [heads, N, N]
        if mask is not None:
            bias = (bias + mask[:, None]).repeat(b, 1, 1, 1)  # [B * nW, heads, N, N], window-minor like q
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, nw, n, c))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and an MLP, both pre-norm with residuals."""

    def __init__(
        self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float, eps: float
    ):
        super().__init__()
        if resolution <= window:  # one window covers the whole grid: no partition, nothing to shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        h = self.norm1(x).view(b, r, r, c)
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, w), self.attn_mask), w, r, r)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + h.reshape(b, r * r, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (C -> 4C), normalised, reduced to 2C: halves the grid."""

    def __init__(self, dim: int, resolution: int, eps: float):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        # the checkpoint's channel order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window, mlp_ratio, eps, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, eps)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution, eps) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """RAM's image encoder: images [B, 3, S, S] (normalised) -> [B, 1 + (S / 2^(stages+1))^2, width]."""

    def __init__(
        self, *, image_size, patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio, norm_eps
    ):
        super().__init__()
        if image_size % patch_size or (image_size // patch_size) % 2 ** (len(depths) - 1):
            raise ValueError(
                f"RAM image_size {image_size} must be divisible by patch_size {patch_size} times "
                f"2^{len(depths) - 1} (one halving per patch merging)"
            )
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim, norm_eps)
        resolution = image_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            stage = SwinStage(
                embed_dim * 2**i, resolution >> i, depth, heads, window_size, mlp_ratio, norm_eps, not last
            )
            self.layers.append(stage)
        self.width = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.width, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"RAM expects {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


class _QueryKeyValue(nn.Module):
    def __init__(self, hidden: int, encoder_width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(encoder_width, hidden)
        self.value = nn.Linear(encoder_width, hidden)


class _AddNorm(nn.Module):
    """BERT's post-LN output: LayerNorm(dense(h) + residual)."""

    def __init__(self, features_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(features_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _CrossAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, encoder_width: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.self = _QueryKeyValue(hidden, encoder_width)
        self.output = _AddNorm(hidden, hidden, eps)

    def forward(self, h: Tensor, memory: Tensor) -> Tensor:
        def heads(x):
            return x.view(*x.shape[:2], self.num_heads, -1).transpose(1, 2)

        qkv = self.self
        context = F.scaled_dot_product_attention(
            heads(qkv.query(h)), heads(qkv.key(memory)), heads(qkv.value(memory))
        )
        return self.output(context.transpose(1, 2).flatten(2), h)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, h: Tensor) -> Tensor:
        return F.gelu(self.dense(h))  # BERT's "gelu": the exact (erf) form


class TaggingHeadLayer(nn.Module):
    """Tag queries cross-attend to the image embeddings, then a feed-forward block (no self-attention)."""

    def __init__(self, hidden: int, num_heads: int, intermediate: int, encoder_width: int, eps: float):
        super().__init__()
        self.crossattention = _CrossAttention(hidden, num_heads, encoder_width, eps)
        self.intermediate = _Intermediate(hidden, intermediate)
        self.output = _AddNorm(intermediate, hidden, eps)

    def forward(self, h: Tensor, memory: Tensor) -> Tensor:
        h = self.crossattention(h, memory)
        return self.output(self.intermediate(h), h)


class _LayerList(nn.Module):
    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TaggingHead(nn.Module):
    """RAM's image-tag recognition decoder (`tagging_head.encoder.layer.{i}` in the checkpoint)."""

    def __init__(self, *, num_layers, hidden_size, num_heads, intermediate_size, encoder_width, norm_eps):
        super().__init__()
        self.encoder = _LayerList(
            [
                TaggingHeadLayer(hidden_size, num_heads, intermediate_size, encoder_width, norm_eps)
                for _ in range(num_layers)
            ]
        )

    def forward(self, queries: Tensor, image_embeds: Tensor) -> Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, image_embeds)
        return queries


class RAM(nn.Module):
    """The tagging part of RAM. Sizes of RAM Swin-L 14M: see docs/compatibility.md (and the model config).

    Args:
        image_size, patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio, swin_norm_eps:
            the Swin image encoder.
        representation_dim: width of `image_proj`'s output and of `label_embed` (512).
        num_classes: number of tags (4585).
        head_layers, head_hidden_size, head_heads, head_intermediate_size, head_norm_eps: the tagging head.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        mlp_ratio: float,
        swin_norm_eps: float,
        representation_dim: int,
        num_classes: int,
        head_layers: int,
        head_hidden_size: int,
        head_heads: int,
        head_intermediate_size: int,
        head_norm_eps: float,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(
                f"RAM depths {list(depths)} and num_heads {list(num_heads)} need one entry per stage"
            )
        self.visual_encoder = SwinTransformer(
            image_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            norm_eps=swin_norm_eps,
        )
        self.image_proj = nn.Linear(self.visual_encoder.width, representation_dim)
        self.label_embed = nn.Parameter(torch.zeros(num_classes, representation_dim))
        # The official model skips the projection (no parameters) when the widths already agree.
        self.wordvec_proj = (
            nn.Identity()
            if head_hidden_size == representation_dim
            else nn.Linear(representation_dim, head_hidden_size)
        )
        self.tagging_head = TaggingHead(
            num_layers=head_layers,
            hidden_size=head_hidden_size,
            num_heads=head_heads,
            intermediate_size=head_intermediate_size,
            encoder_width=representation_dim,
            norm_eps=head_norm_eps,
        )
        self.fc = nn.Linear(head_hidden_size, 1)

    @property
    def num_classes(self) -> int:
        return self.label_embed.shape[0]

    def image_embeds(self, pixels: Tensor) -> Tensor:
        """SeeSR's representation (`generate_image_embeds`): image_proj(visual_encoder(pixels)), [B, 1 + L, 512]."""
        return self.image_proj(self.visual_encoder(pixels))

    def tag_logits(self, image_embeds: Tensor) -> Tensor:
        """One logit per tag, [B, classes]."""
        queries = (
            F.relu(self.wordvec_proj(self.label_embed)).unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        )
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(image embeddings [B, 1 + L, 512], tag logits [B, classes])."""
        embeds = self.image_embeds(pixels)
        return embeds, self.tag_logits(embeds)


def load_tensors(path: Path, what: str):
    """A checkpoint of tensors, read with `weights_only=True`: a pickle that would build anything else
    (and could run code) is refused, in one line naming the file and what it tried to build."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        built = f" (it builds {unsafe.group(1)})" if unsafe else ""
        raise ValueError(
            f"{path}: refused, not a plain {what}{built}: only tensors are read (weights_only=True), since "
            "unpickling anything else can run code"
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable {what} ({type(error).__name__}: {first})") from None


def load_ram_checkpoint(model: RAM, path: str | Path) -> dict[str, int]:
    """Load `ram_swin_large_14m.pth` (state dict under "model") into `model`, strictly for what RAM uses.

    Returns the number of skipped keys per reason; they are also logged.
    """
    path = _require_file(
        Path(path), "the RAM checkpoint", "download ram_swin_large_14m.pth once and place it there"
    )
    checkpoint = load_tensors(path, "RAM checkpoint")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a RAM checkpoint: expected a dict with a state dict under 'model'")
    # Early RAM releases named the tagging head `vision_multi`.
    state = {k.replace("vision_multi", "tagging_head"): v for k, v in state.items()}
    skipped: Counter[str] = Counter()
    kept = {}
    for key, value in state.items():
        part = next((p for p in UNUSED_CHECKPOINT_PARTS if key.startswith(p)), None)
        if part is not None:
            skipped[part.rstrip(".")] += 1
        elif key.endswith(RECOMPUTED_BUFFERS):
            skipped["recomputed buffers"] += 1
        else:
            kept[key] = value
    own = model.state_dict()
    for key, value in kept.items():
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} but this RAM's window gives {tuple(own[key].shape)}; "
                "set window_size to the checkpoint's (12 for RAM Swin-L 14M)"
            )
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not fit this RAM: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}). Check the RAM sizes in the model config against the checkpoint."
        )
    logger.info("Loaded RAM from %s; skipped keys not used for tagging: %s", path, dict(skipped))
    return dict(skipped)


def merge_dape(model: RAM, lora: str | Path | dict[str, Tensor], *, lora_alpha: float) -> dict[str, int]:
    """Merge SeeSR's DAPE LoRA into the RAM weights: W += B @ A * lora_alpha / r (loralib's merge).

    DAPE trains LoRA on every Swin `attn.qkv` (query and value rows only: loralib's MergedLinear with
    enable_lora [True, False, True]) and on the query and key of the tagging head's cross-attention.
    The official model ties the first layers of `tag_encoder` to the tagging head, so their LoRA
    deltas land on the same weights and are merged here too. LoRA on the rest of `tag_encoder` and
    on `text_decoder` does not touch tagging and is skipped. Returns counts of merged / skipped
    LoRA pairs.
    """
    if not isinstance(lora, dict):
        path = _require_file(Path(lora), "the DAPE LoRA file", "download SeeSR's DAPE.pth and place it there")
        lora = load_tensors(path, "DAPE LoRA file")
    not_lora = [k for k in lora if ".lora_" not in k]
    if not_lora:
        raise ValueError(f"Not a DAPE LoRA file: keys without 'lora_', e.g. {not_lora[:3]}")
    modules = sorted({k.rsplit(".", 1)[0] for k in lora})
    unpaired = [m for m in modules if f"{m}.lora_A" not in lora or f"{m}.lora_B" not in lora]
    if unpaired:
        raise ValueError(f"DAPE file has LoRA modules without both lora_A and lora_B: {unpaired[:3]}")
    counts: Counter[str] = Counter()
    head_layers = len(model.tagging_head.encoder.layer)
    with torch.no_grad():
        for module in modules:
            a, b = lora[f"{module}.lora_A"].float(), lora[f"{module}.lora_B"].float()
            target = _lora_target(model, module, head_layers)
            if target is None:
                counts["skipped (not used for tagging)"] += 1
                continue
            weight = target.weight
            if module.endswith("attn.qkv"):
                dim = weight.shape[1]
                rank = a.shape[0] // 2
                if a.shape != (2 * rank, dim) or b.shape != (2 * dim, rank):
                    raise ValueError(
                        f"DAPE {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not "
                        f"query/value LoRA for a {dim}-wide qkv"
                    )
                scale = lora_alpha / rank
                weight[:dim] += (b[:dim] @ a[:rank] * scale).to(weight.dtype)  # query rows
                weight[2 * dim :] += (b[dim:] @ a[rank:] * scale).to(weight.dtype)  # value rows
            else:
                rank = a.shape[0]
                if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                    raise ValueError(
                        f"DAPE {module}: B @ A is {b.shape[0]}x{a.shape[1]}, weight is {tuple(weight.shape)}"
                    )
                weight += (b @ a * (lora_alpha / rank)).to(weight.dtype)
            counts["merged"] += 1
    logger.info("Merged DAPE LoRA into RAM: %s", dict(counts))
    return dict(counts)


def _lora_target(model: RAM, module: str, head_layers: int) -> nn.Linear | None:
    parts = module.split(".")
    if module.startswith("visual_encoder.") and module.endswith(".attn.qkv"):
        return model.get_submodule(module)
    if parts[0] in ("tagging_head", "tag_encoder") and parts[1:3] == ["encoder", "layer"]:
        layer, rest = int(parts[3]), parts[4:]
        if parts[0] == "tagging_head" or (layer < head_layers and rest[0] == "crossattention"):
            return model.get_submodule(".".join(["tagging_head", "encoder", "layer", str(layer), *rest]))
    return None


def read_tag_list(folder: str | Path, tag_list: str, tag_thresholds: str) -> tuple[list[str], list[float]]:
    """RAM's tag names and per-tag thresholds from the user's RAM folder (one entry per line)."""
    folder = Path(folder)
    fix = "copy it from the recognize-anything release (ram/data/) into that folder"
    tags = _require_file(folder / tag_list, "the RAM tag list", fix).read_text(encoding="utf-8").splitlines()
    lines = _require_file(folder / tag_thresholds, "the RAM tag thresholds", fix).read_text(encoding="utf-8")
    thresholds = [float(s) for s in lines.split()]
    if len(thresholds) != len(tags):
        raise ValueError(
            f"{folder / tag_thresholds} has {len(thresholds)} thresholds for {len(tags)} tags in {folder / tag_list}"
        )
    return tags, thresholds


class RAMTagger(nn.Module):
    """Frozen RAM (DAPE-merged or not) as a `Tagger`: images in [0, 1] -> tags and representation.

    Preprocessing: resize to the RAM input size (`interpolation`, `antialias`), clamp to [0, 1],
    normalise with `image_mean`/`image_std`. Tags: those whose sigmoid(logit) exceeds their class
    threshold, in tag-list order, joined by `tag_separator` (SeeSR: ", "). The representation is
    returned in float32 whatever `dtype` RAM runs in.
    """

    def __init__(
        self,
        ram: RAM,
        tag_list: Sequence[str],
        class_thresholds: Sequence[float],
        *,
        interpolation: str,
        antialias: bool,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        tag_separator: str,
        dtype: torch.dtype | str = torch.float32,
    ):
        super().__init__()
        dtype = resolve_dtype(dtype)
        if not len(tag_list) == len(class_thresholds) == ram.num_classes:
            raise ValueError(
                f"RAM has {ram.num_classes} classes but got {len(tag_list)} tags and {len(class_thresholds)} thresholds"
            )
        self.ram = ram.to(dtype).eval().requires_grad_(False)
        self.tag_list = list(tag_list)
        self.interpolation = interpolation
        self.antialias = antialias
        self.tag_separator = tag_separator
        self.dtype = dtype
        self.register_buffer(
            "class_thresholds", torch.tensor(class_thresholds, dtype=torch.float32), persistent=False
        )
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, recurse=True):
        # The per-tag thresholds stay float32 whatever dtype the tagger is cast to (a bf16 pipeline
        # casts it whole): rounded to bf16 they would move by up to 2^-9 and flip the tags near them.
        thresholds = self.class_thresholds
        super()._apply(fn, recurse)
        self.class_thresholds = thresholds.to(self.class_thresholds.device)
        return self

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        architecture: dict,
        checkpoint: str,
        tag_list: str,
        tag_thresholds: str,
        dape: str | Path | None,
        lora_alpha: float,
        **kwargs,
    ) -> RAMTagger:
        """RAM from `<folder>/<checkpoint>` with tags from `<folder>/<tag_list>`, `<folder>/<tag_thresholds>`,
        plus DAPE merged from the file `dape` unless it is None. `architecture`: RAM's constructor arguments."""
        tags, thresholds = read_tag_list(folder, tag_list, tag_thresholds)
        ram = RAM(**architecture)
        load_ram_checkpoint(ram, Path(folder) / checkpoint)
        if dape is not None:
            merge_dape(ram, dape, lora_alpha=lora_alpha)
        return cls(ram, tags, thresholds, **kwargs)

    @classmethod
    def random(
        cls,
        *,
        architecture: dict,
        tag_list: Sequence[str],
        class_thresholds: Sequence[float],
        weights: str | Path | None = None,
        **kwargs,
    ):
        """A randomly initialised RAM (tiny test and demo configs); `label_embed`, which a checkpoint
        normally fills, is drawn from N(0, 1) so that tags differ between images. `weights`: the
        safetensors file an exported student saved these draws in (`method.export`), loaded exactly."""
        ram = RAM(**architecture)
        with torch.no_grad():
            ram.label_embed.normal_()
        if weights is not None:
            from safetensors.torch import load_file

            ram.load_state_dict(load_file(str(weights)), strict=True)
        return cls(ram, tag_list, class_thresholds, **kwargs)

    @property
    def input_size(self) -> tuple[int, int]:
        """The side RAM's image encoder takes (384 for Swin-L)."""
        size = self.ram.visual_encoder.image_size
        return (size, size)

    def preprocess(self, images: Tensor) -> Tensor:
        size = self.ram.visual_encoder.image_size
        x = F.interpolate(
            images.float(), size=(size, size), mode=self.interpolation, antialias=self.antialias
        )
        x = (x.clamp(0, 1) - self.image_mean) / self.image_std
        # the weights' dtype: `dtype`, unless a caller cast the whole module since
        return x.to(self.ram.visual_encoder.patch_embed.proj.weight.dtype)

    @torch.no_grad()
    def forward(self, images: Tensor) -> TaggerOutput:
        mask, representation = self.tag_mask(images)
        return TaggerOutput(self.tags_from_mask(mask), representation)

    @torch.no_grad()
    def tag_mask(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(which tags each image has [B, classes] bool, representation [B, 1 + L, 512] float32) from one
        RAM pass, as tensors only (the prompt's ids are built from the mask on the device)."""
        # RAM runs in its own `dtype`, not in the trainer's autocast dtype: tags flip near thresholds
        with autocast_off(images.device.type):
            embeds = self.ram.image_embeds(self.preprocess(images))
            logits = self.ram.tag_logits(embeds)
        return self.mask_from_logits(logits), embeds.float()

    @torch.no_grad()
    def representation(self, images: Tensor) -> Tensor:
        with autocast_off(images.device.type):
            return self.ram.image_embeds(self.preprocess(images)).float()

    def mask_from_logits(self, logits: Tensor) -> Tensor:
        """The tags whose probability exceeds their class threshold, compared in float32."""
        return torch.sigmoid(logits.float()) > self.class_thresholds

    def tags_from_mask(self, mask: Tensor) -> list[str]:
        """Each image's tags in tag-list order, joined by `tag_separator` (on the host: the mask comes there
        in one copy)."""
        mask = mask.cpu()
        return [
            self.tag_separator.join(self.tag_list[i] for i in row.nonzero().flatten().tolist())
            for row in mask
        ]


def _require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Missing {what}: expected {path}; {fix}.")
    return path
