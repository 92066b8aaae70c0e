"""Large images: a tiled VAE codec and a tiled denoiser, both drop-in replacements.

`TiledVaeCodec` has `VaeCodec`'s interface and runs the VAE's high-resolution layers tile by tile, so
their peak memory depends on the tile size and not on the image size. Tiles of a VAE disagree when
each GroupNorm normalises with its own tile's statistics; here all tiles share one set: either
measured on a copy of the input scaled down to at most `stats_size` pixels ("estimate", one cheap
extra pass, exact when the input is that small) or gathered over the tiles themselves ("exact", one
partial pass over the tiles per GroupNorm). Each tile also runs with context around it, and the
latent-resolution middle of the VAE (with its global attention) runs untiled, so tiles compute the
same values wherever their borders fall: no seams, and with exact statistics the untiled result.
Results are written tile by tile into a buffer on `output_device` (the CPU by default), so the
full-resolution image never has to fit on the accelerator.

`TiledDenoiser` has `Denoiser`'s forward signature and runs the wrapped denoiser on overlapping
latent tiles (with the matching control-image tiles), blending the predicted noise with Gaussian
weights as MultiDiffusion does; several tiles share one forward pass up to `tile_batch_size`.

Both pass through untouched when the input fits in one tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addsr_pl.models.conditioning import Conditioning


def tile_spans(length: int, tile_size: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """Spans (start, stop) covering [0, length) with equal tiles of at most `tile_size`.

    One span when `length <= tile_size`. Otherwise the fewest tiles that overlap by at least
    `overlap`, each made as small as that allows (rounded up to a multiple of `align`, e.g. the
    UNet's downsampling factor), spread evenly.
    """
    if length <= tile_size:
        return [(0, length)]
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile overlap must be in [0, tile size {tile_size}), got {overlap}")
    if tile_size % align:
        raise ValueError(f"tile size {tile_size} must be a multiple of {align}")
    count = math.ceil((length - overlap) / (tile_size - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    size = min(math.ceil(size / align) * align, tile_size)
    starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return [(start, start + size) for start in starts]


@dataclass(frozen=True)
class TilingPlan:
    """How an output of `height` x `width` pixels is tiled; a tile size of None means untiled."""

    vae_tile_size: int | None  # pixels
    vae_grid: tuple[int, int]  # tiles along (height, width)
    latent_tile_size: int | None  # latent cells
    latent_grid: tuple[int, int]

    def describe(self) -> str:
        vae = "untiled" if self.vae_tile_size is None else f"{self.vae_grid} tiles of {self.vae_tile_size} px"
        latent = (
            "untiled"
            if self.latent_tile_size is None
            else f"{self.latent_grid} tiles of {self.latent_tile_size} latent cells"
        )
        return f"VAE {vae}; diffusion {latent}"


def plan_tiling(
    height: int,
    width: int,
    *,
    scale_factor: int,
    vae_tile_size: int | None,
    vae_overlap: int,
    latent_tile_size: int | None,
    latent_overlap: int,
    latent_align: int = 1,
) -> TilingPlan:
    """Decide the tiles for an output of `height` x `width` pixels from the configured thresholds.

    A stage is tiled when the image exceeds its tile size along either side; a tile size of None or 0
    turns tiling of that stage off. The VAE tile size and overlap are in pixels (multiples of
    `scale_factor`), the latent ones in latent cells. The sizes reported are those actually run
    (`tile_spans` shrinks tiles to the smallest size covering the image).
    """
    vae_size, vae_grid = _stage_plan(height, width, vae_tile_size, vae_overlap, scale_factor)
    lat_size, lat_grid = _stage_plan(
        height // scale_factor, width // scale_factor, latent_tile_size, latent_overlap, latent_align
    )
    return TilingPlan(vae_size, vae_grid, lat_size, lat_grid)


def _stage_plan(
    height: int, width: int, tile_size: int | None, overlap: int, align: int
) -> tuple[int | None, tuple[int, int]]:
    if not tile_size or (height <= tile_size and width <= tile_size):
        return None, (1, 1)
    rows = tile_spans(height, tile_size, overlap, align)
    cols = tile_spans(width, tile_size, overlap, align)
    return max(rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]), (len(rows), len(cols))


# ------------------------------------------------------------------------------------------ tiled VAE

# "exact": GroupNorm statistics of the whole input, gathered tile by tile (one partial pass over the
# tiles per GroupNorm call of the high-resolution layers); "estimate": those of a scaled-down copy.
_STATISTICS = ("exact", "estimate")


def _ramp(length: int, overlap: int, rise: bool, fall: bool) -> Tensor:
    """1-D blending weights: linear ramps over `overlap` cells on the sides that meet another tile."""
    weights = torch.ones(length)
    if overlap > 0:
        ramp = (torch.arange(overlap) + 0.5) / overlap
        if rise:
            weights[:overlap] = torch.minimum(weights[:overlap], ramp)
        if fall:
            weights[-overlap:] = torch.minimum(weights[-overlap:], ramp.flip(0))
    return weights


class _Reached(Exception):
    """Raised by a hook to end a forward pass at the GroupNorm call whose input is wanted."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value


class _GroupNormStatistics:
    """Records per-sample, per-group statistics of the GroupNorms inside `modules`, then normalises
    tiles with them (call i of a GroupNorm in a tile uses the statistics of its call i)."""

    def __init__(self, modules: list[nn.Module]):
        self.norms = [m for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[nn.GroupNorm, list[tuple[Tensor, Tensor]]] = {}
        self.order: list[tuple[nn.GroupNorm, int]] = []  # (norm, call index) in the order they run
        self.calls: dict[nn.GroupNorm, int] = {}
        self.stop_at: tuple[nn.GroupNorm, int] | None = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.stats = {norm: [] for norm in self.norms}
        self.order = []

        def record(norm: nn.GroupNorm, args: tuple) -> None:
            groups = args[0].detach().float().reshape(args[0].shape[0], norm.num_groups, -1)
            self.order.append((norm, len(self.stats[norm])))
            self.stats[norm].append((groups.mean(-1), groups.var(-1, unbiased=False)))

        with self._hooks(lambda norm: norm.register_forward_pre_hook(record)):
            yield

    @contextmanager
    def applied(self) -> Iterator[None]:
        def stop(norm: nn.GroupNorm, args: tuple) -> None:
            if self.stop_at == (norm, self.calls.get(norm, 0)):
                raise _Reached(args[0])

        def normalise(norm: nn.GroupNorm, args: tuple, output: Tensor) -> Tensor:
            index = self.calls.get(norm, 0)
            self.calls[norm] = index + 1
            mean, var = self.stats[norm][index]
            x = args[0]
            groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
            groups = (groups - mean.to(x.device)[..., None]) * torch.rsqrt(
                var.to(x.device)[..., None] + norm.eps
            )
            y = groups.reshape(x.shape)
            if norm.affine:
                shape = (1, -1) + (1,) * (x.ndim - 2)
                y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
            return y.to(output.dtype)

        with (
            self._hooks(lambda norm: norm.register_forward_pre_hook(stop)),
            self._hooks(lambda norm: norm.register_forward_hook(normalise)),
        ):
            yield

    def start_tile(self, stop_at: tuple[nn.GroupNorm, int] | None = None) -> None:
        self.calls = {}
        self.stop_at = stop_at

    @contextmanager
    def _hooks(self, register) -> Iterator[None]:
        handles = [register(norm) for norm in self.norms]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass(frozen=True)
class _Tile:
    """One VAE tile on the latent grid: its span, the span run with context, and the part it owns
    (a partition of the grid, split in the middle of each overlap), each as (top, bottom, left, right)."""

    span: tuple[int, int, int, int]
    context: tuple[int, int, int, int]
    owned: tuple[int, int, int, int]


def _owned(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Split [0, length) between overlapping spans at the middle of each overlap."""
    cuts = [0] + [(previous[1] + current[0]) // 2 for previous, current in zip(spans, spans[1:])] + [length]
    return list(zip(cuts, cuts[1:]))


class TiledVaeCodec(nn.Module):
    """`VaeCodec` run tile by tile at high resolution; inference only (no autograd graph).

    The diffusers `AutoencoderKL` is split where it reaches latent resolution. The high-resolution
    layers (encoder down blocks; decoder up blocks and output) run on tiles, each with `padding`
    pixels of context that are computed and cut off again, and normalised with GroupNorm statistics
    shared by all tiles (see `statistics`). The latent-resolution middle (the mid block with its
    global attention) runs once on the whole latent, exactly as untiled: its memory is that of the
    latent with the VAE's widest channel count (512 for SD2), a small fraction of one
    full-resolution activation.

    Args:
        codec: a `VaeCodec` around a diffusers `AutoencoderKL`.
        tile_size: tile side in pixels, a multiple of the scale factor; inputs whose image is no
            larger than one tile run untiled.
        overlap: overlap of neighbouring tiles in pixels (multiple of the scale factor), blended
            with linear ramps.
        padding: context around each tile in pixels (multiple of the scale factor); tiles agree with
            the untiled codec once it covers the layers' receptive field.
        stats_size: longest side, in pixels, of the scaled-down copy whose GroupNorm statistics
            "estimate" uses; None takes `tile_size`. Statistics are exact for images no larger.
        statistics: "estimate" (from the scaled-down copy: one extra pass at `stats_size`) or
            "exact" (of the whole input, gathered over the tiles: one partial pass over all tiles per
            GroupNorm of the high-resolution layers, about ten times the work of the tiles alone).
        output_device: where results are assembled; None keeps the input's device.
    """

    def __init__(
        self,
        codec: nn.Module,
        tile_size: int,
        overlap: int,
        padding: int,
        stats_size: int | None = None,
        statistics: str = "estimate",
        output_device: torch.device | str | None = "cpu",
    ):
        super().__init__()
        if statistics not in _STATISTICS:
            raise ValueError(
                f"TiledVaeCodec statistics={statistics!r}; choose one of {', '.join(_STATISTICS)}"
            )
        factor = codec.scale_factor
        for name, value in (("tile_size", tile_size), ("overlap", overlap), ("padding", padding)):
            if value % factor or value < 0:
                raise ValueError(
                    f"TiledVaeCodec {name}={value} must be a non-negative multiple of the VAE scale {factor}"
                )
        if not 0 <= overlap < tile_size:
            raise ValueError(f"TiledVaeCodec overlap={overlap} must be in [0, tile_size={tile_size})")
        self.codec = codec
        self.tile_size = tile_size
        self.overlap = overlap
        self.padding = padding
        self.stats_size = stats_size or tile_size
        self.statistics = statistics
        self.output_device = output_device
        vae = codec.vae
        self._encoder_stats = _GroupNormStatistics([vae.encoder.down_blocks])
        self._decoder_stats = _GroupNormStatistics([vae.decoder.up_blocks, vae.decoder.conv_norm_out])

    @property
    def scale_factor(self) -> int:
        return self.codec.scale_factor

    @property
    def scaling_factor(self) -> float:
        return self.codec.scaling_factor

    def _fits(self, pixel_height: int, pixel_width: int) -> bool:
        return pixel_height <= self.tile_size and pixel_width <= self.tile_size

    def _out_device(self, inputs: Tensor) -> torch.device:
        return inputs.device if self.output_device is None else torch.device(self.output_device)

    @torch.no_grad()
    def encode(self, images: Tensor, posterior_noise: Tensor | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] (H, W multiples of the scale factor) -> scaled latents (the
        posterior mean; a sample with `posterior_noise` only where the image fits one tile)."""
        factor = self.scale_factor
        height, width = images.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"TiledVaeCodec.encode needs sides that are multiples of {factor}, got {height}x{width}"
            )
        vae = self.codec.vae
        device, dtype = _device_dtype(vae)
        if self._fits(height, width):
            noise = None if posterior_noise is None else posterior_noise.to(device)
            return self.codec.encode(images.to(device), noise).to(self._out_device(images))
        if posterior_noise is not None:
            raise ValueError(
                f"start_latent = 'sample' encodes the whole image at once, but {height}x{width} exceeds the VAE "
                f"tile ({self.tile_size} px): raise --vae-tile-size to {max(height, width)} or use --start-latent mean"
            )
        with self._encoder_stats.recording():
            self.codec.encode(self._scaled_down(images, factor).to(device))
        encoder = vae.encoder

        def high_resolution(pixels: Tensor) -> Tensor:
            hidden = encoder.conv_in(pixels.to(device, dtype) * 2 - 1)
            for block in encoder.down_blocks:
                hidden = block(hidden)
            return hidden

        with self._encoder_stats.applied():
            if self.statistics == "exact":
                self._exact_statistics(high_resolution, images, self._encoder_stats, in_step=factor)
            hidden = self._tiled(
                high_resolution, images, self._encoder_stats, in_step=factor, out_step=1, out_device=device
            )
        hidden = encoder.mid_block(hidden.to(dtype))
        moments = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(hidden)))
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
        mean = moments.chunk(2, dim=1)[0]  # the posterior mean, as VaeCodec.encode
        return ((mean - self.codec.shift_factor) * self.scaling_factor).to(self._out_device(images))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, C, h, w] -> images [B, 3, h * f, w * f] in [0, 1] (float32)."""
        factor = self.scale_factor
        vae = self.codec.vae
        device, dtype = _device_dtype(vae)
        if self._fits(latents.shape[-2] * factor, latents.shape[-1] * factor):
            return self.codec.decode(latents.to(device)).to(self._out_device(latents))
        with self._decoder_stats.recording():
            self.codec.decode(self._scaled_down(latents, 1).to(device))
        decoder = vae.decoder
        z = latents.to(device, dtype) / self.scaling_factor + self.codec.shift_factor
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        hidden = decoder.mid_block(decoder.conv_in(z), None)
        hidden = hidden.to(next(decoder.up_blocks.parameters()).dtype)

        def high_resolution(features: Tensor) -> Tensor:
            for block in decoder.up_blocks:
                features = block(features, None)
            images = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(features)))
            return (images.float() + 1) / 2

        with self._decoder_stats.applied():
            if self.statistics == "exact":
                self._exact_statistics(high_resolution, hidden, self._decoder_stats, in_step=1)
            return self._tiled(
                high_resolution,
                hidden,
                self._decoder_stats,
                in_step=1,
                out_step=factor,
                out_device=self._out_device(latents),
            )

    def _tiles(self, lat_h: int, lat_w: int) -> list[_Tile]:
        """The tile layout on the latent grid, with context and the part of the grid each tile owns."""
        factor = self.scale_factor
        tile, overlap, pad = self.tile_size // factor, self.overlap // factor, self.padding // factor
        rows, cols = tile_spans(lat_h, tile, overlap), tile_spans(lat_w, tile, overlap)
        row_owned, col_owned = _owned(rows, lat_h), _owned(cols, lat_w)
        tiles = []
        for (top, bottom), owned_rows in zip(rows, row_owned):
            for (left, right), owned_cols in zip(cols, col_owned):
                context = (
                    max(0, top - pad),
                    min(lat_h, bottom + pad),
                    max(0, left - pad),
                    min(lat_w, right + pad),
                )
                tiles.append(_Tile((top, bottom, left, right), context, (*owned_rows, *owned_cols)))
        return tiles

    def _tiled(
        self,
        fn,
        inputs: Tensor,
        stats: _GroupNormStatistics,
        in_step: int,
        out_step: int,
        out_device: torch.device,
    ) -> Tensor:
        """Run `fn` on padded tiles of `inputs` laid out on the latent grid (`in_step` / `out_step`
        input / output cells per latent cell) and blend the cropped results into one buffer."""
        lat_h, lat_w = (s // in_step for s in inputs.shape[-2:])
        ramp = self.overlap // self.scale_factor * out_step
        output = weight = None
        for tile in self._tiles(lat_h, lat_w):
            stats.start_tile()
            top, bottom, left, right = tile.span
            top_in, bottom_in, left_in, right_in = tile.context
            result = fn(
                inputs[..., top_in * in_step : bottom_in * in_step, left_in * in_step : right_in * in_step]
            )
            result = result[
                ...,
                (top - top_in) * out_step : (bottom - top_in) * out_step,
                (left - left_in) * out_step : (right - left_in) * out_step,
            ]
            result = result.float().to(out_device)
            if output is None:
                size = (lat_h * out_step, lat_w * out_step)
                output = torch.zeros(*result.shape[:2], *size, device=out_device)
                weight = torch.zeros(1, 1, *size, device=out_device)
            window = _ramp(result.shape[-2], ramp, top > 0, bottom < lat_h)[:, None]
            window = (window * _ramp(result.shape[-1], ramp, left > 0, right < lat_w)).to(out_device)
            region = (..., slice(top * out_step, bottom * out_step), slice(left * out_step, right * out_step))
            output[region] += result * window
            weight[region] += window
        return output / weight

    def _exact_statistics(self, fn, inputs: Tensor, stats: _GroupNormStatistics, in_step: int) -> None:
        """Replace the estimated statistics by those of the whole input, one GroupNorm call at a time
        in the order they run: every tile runs up to that call (earlier calls already normalised with
        exact statistics) and adds up the call's input over the part of the latent grid it owns."""
        lat_h, lat_w = (s // in_step for s in inputs.shape[-2:])
        tiles = self._tiles(lat_h, lat_w)
        for norm, index in stats.order:
            total = total_sq = None
            count = 0
            for tile in tiles:
                top_in, bottom_in, left_in, right_in = tile.context
                stats.start_tile(stop_at=(norm, index))
                try:
                    fn(
                        inputs[
                            ...,
                            top_in * in_step : bottom_in * in_step,
                            left_in * in_step : right_in * in_step,
                        ]
                    )
                except _Reached as reached:
                    value = reached.value
                else:
                    raise RuntimeError("a GroupNorm of the statistics pass did not run on a tile")
                # feature cells per latent cell at this layer (a power of two, at least one)
                scale = value.shape[-1] // (right_in - left_in)
                own_top, own_bottom, own_left, own_right = tile.owned
                owned = value[
                    ...,
                    (own_top - top_in) * scale : (own_bottom - top_in) * scale,
                    (own_left - left_in) * scale : (own_right - left_in) * scale,
                ]
                groups = owned.double().reshape(owned.shape[0], norm.num_groups, -1)
                sums, squares = groups.sum(-1), (groups * groups).sum(-1)
                total = sums if total is None else total + sums
                total_sq = squares if total_sq is None else total_sq + squares
                count += groups.shape[-1]
            mean = total / count
            var = (total_sq / count - mean * mean).clamp_min(0)
            stats.stats[norm][index] = (mean.float(), var.float())
        stats.start_tile()

    def _scaled_down(self, inputs: Tensor, step: int) -> Tensor:
        """`inputs` scaled so the image they stand for is at most `stats_size` pixels along the longest
        side; `step` is the input cells per latent cell (the scale factor for images, 1 for latents)."""
        cells = max(1, self.stats_size // self.scale_factor)
        lat_h, lat_w = (s // step for s in inputs.shape[-2:])
        scale = cells / max(lat_h, lat_w)
        if scale >= 1:
            return inputs
        size = (max(1, round(lat_h * scale)) * step, max(1, round(lat_w * scale)) * step)
        return F.interpolate(inputs.float(), size=size, mode="area").to(inputs.dtype)


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


# ------------------------------------------------------------------------------- tiled latent diffusion


def gaussian_weights(height: int, width: int, sigma: float) -> Tensor:
    """[height, width] Gaussian blending weights centred on the tile, std `sigma` x the tile side."""

    def axis(length: int) -> Tensor:
        positions = torch.arange(length, dtype=torch.float64) - (length - 1) / 2
        return torch.exp(-0.5 * (positions / (sigma * length)) ** 2)

    return (axis(height)[:, None] * axis(width)[None, :]).float()


class TiledDenoiser(nn.Module):
    """A `Denoiser` run on overlapping latent tiles, eps blended with Gaussian weights (MultiDiffusion).

    The control image is cut at the matching pixel coordinates (latent coordinates times the ratio
    of the control image to the latent). Up to `tile_batch_size` tiles of all samples go through the
    wrapped denoiser together, with the conditioning repeated for each tile. A latent no larger than
    `tile_size` along both sides is passed to the wrapped denoiser as it is.

    Args:
        denoiser: anything with `Denoiser.forward`'s signature.
        tile_size: tile side in latent cells, a multiple of `align`.
        overlap: minimum overlap of neighbouring tiles in latent cells.
        tile_batch_size: how many tiles share one forward pass.
        weight_sigma: std of the Gaussian blending weights relative to the tile side.
        align: tile sides are multiples of this (the UNet's downsampling factor); None reads it from
            `denoiser.unet.config.block_out_channels`.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        tile_size: int,
        overlap: int,
        tile_batch_size: int,
        weight_sigma: float,
        align: int | None = None,
    ):
        super().__init__()
        if align is None:
            unet = getattr(denoiser, "unet", None)
            if unet is None:
                raise ValueError("TiledDenoiser needs `align` for a denoiser without a `unet` attribute")
            align = 2 ** (len(unet.config.block_out_channels) - 1)
        if tile_size % align:
            raise ValueError(f"TiledDenoiser tile_size={tile_size} must be a multiple of {align}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"TiledDenoiser overlap={overlap} must be in [0, tile_size={tile_size})")
        if tile_batch_size < 1:
            raise ValueError(f"TiledDenoiser tile_batch_size must be >= 1, got {tile_batch_size}")
        self.denoiser = denoiser
        self.tile_size = tile_size
        self.overlap = overlap
        self.tile_batch_size = tile_batch_size
        self.weight_sigma = weight_sigma
        self.align = align

    def forward(self, z_t: Tensor, t: Tensor, control_image: Tensor, conditioning: Conditioning) -> Tensor:
        batch, _, height, width = z_t.shape
        device = next(self.denoiser.parameters()).device
        if height <= self.tile_size and width <= self.tile_size:
            eps = self.denoiser(z_t.to(device), t.to(device), control_image.to(device), conditioning)
            return eps.to(z_t.device)
        factor = control_image.shape[-1] // width
        if control_image.shape[-2:] != (height * factor, width * factor):
            raise ValueError(
                f"control image {tuple(control_image.shape[-2:])} is not the latent {height}x{width} "
                "times a whole scale factor"
            )
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        tiles = [
            (top, bottom, left, right)
            for top, bottom in tile_spans(height, self.tile_size, self.overlap, self.align)
            for left, right in tile_spans(width, self.tile_size, self.overlap, self.align)
        ]
        tile_h, tile_w = tiles[0][1] - tiles[0][0], tiles[0][3] - tiles[0][2]
        window = gaussian_weights(tile_h, tile_w, self.weight_sigma).to(z_t.device)
        eps = torch.zeros(z_t.shape, dtype=torch.float32, device=z_t.device)
        weight = torch.zeros(height, width, device=z_t.device)
        out_dtype = None
        for first in range(0, len(tiles), self.tile_batch_size):
            group = tiles[first : first + self.tile_batch_size]
            count = len(group)
            # sample-major order (sample 0's tiles, then sample 1's) to match Conditioning.repeat
            latents = torch.stack([z_t[..., a:b, c:d] for a, b, c, d in group], dim=1).flatten(0, 1)
            controls = torch.stack(
                [
                    control_image[..., a * factor : b * factor, c * factor : d * factor]
                    for a, b, c, d in group
                ],
                dim=1,
            ).flatten(0, 1)
            result = self.denoiser(
                latents.to(device),
                t.repeat_interleave(count).to(device),
                controls.to(device),
                conditioning.repeat(count),
            )
            out_dtype = result.dtype
            result = result.float().to(z_t.device).unflatten(0, (batch, count))
            for index, (a, b, c, d) in enumerate(group):
                eps[..., a:b, c:d] += result[:, index] * window
                weight[a:b, c:d] += window
        return (eps / weight).to(out_dtype)
