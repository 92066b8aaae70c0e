"""Tiled VAE and tiled denoiser: agreement with the untiled models, no seams, bounded tile sizes."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from addsr_pl.core.sampler import Denoiser
from addsr_pl.inference.tiling import TiledDenoiser, TiledVaeCodec, gaussian_weights, plan_tiling, tile_spans
from addsr_pl.models.conditioning import Conditioning
from addsr_pl.models.vae import VaeCodec

SIZE = 96  # pixels; the tiny VAE halves it once (scale factor 2)
# Tiles of 32 px with 8 px overlap and 16 px of context: the context covers the receptive field of
# the tiny VAE's high-resolution layers, so tiles reproduce the untiled codec to float precision.
TILE, OVERLAP, PADDING = 32, 8, 16
EXACT = 1e-5  # float32 reordering only


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()
    return VaeCodec(vae)


def _gradient(size=SIZE):
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([x, y, (x + y) / 2])[None]


@pytest.mark.parametrize("length", [1, 7, 16, 17, 40, 63, 64, 65, 100, 257])
@pytest.mark.parametrize(("tile", "overlap", "align"), [(16, 4, 1), (16, 0, 8), (32, 8, 8), (24, 12, 4)])
def test_tile_spans_cover_with_equal_aligned_overlapping_tiles(length, tile, overlap, align):
    spans = tile_spans(length, tile, overlap, align)
    if length <= tile:
        assert spans == [(0, length)]
        return
    sizes = {stop - start for start, stop in spans}
    assert len(sizes) == 1
    size = sizes.pop()
    assert size <= tile and size % align == 0
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        assert stop - start >= overlap
    # the fewest tiles: one fewer could not cover the length with this overlap
    assert (len(spans) - 1) * tile - (len(spans) - 2) * overlap < length


def test_plan_tiling():
    plan = plan_tiling(
        4000,
        3000,
        scale_factor=8,
        vae_tile_size=1024,
        vae_overlap=64,
        latent_tile_size=128,
        latent_overlap=16,
        latent_align=8,
    )
    assert plan.vae_grid == (5, 4) and plan.vae_tile_size <= 1024
    assert plan.latent_grid == (5, 4) and plan.latent_tile_size % 8 == 0
    small = plan_tiling(
        512, 512, scale_factor=8, vae_tile_size=1024, vae_overlap=64, latent_tile_size=0, latent_overlap=0
    )
    assert small.vae_tile_size is None and small.latent_tile_size is None
    assert "untiled" in small.describe()


def test_tiled_vae_matches_untiled_codec(codec):
    image = torch.rand(2, 3, 64, SIZE, generator=torch.Generator().manual_seed(1))
    tiled = TiledVaeCodec(codec, TILE, OVERLAP, PADDING, stats_size=SIZE)  # exact GroupNorm statistics
    with torch.no_grad():
        latents = codec.encode(image)
        decoded = codec.decode(latents)
    assert (tiled.encode(image) - latents).abs().max() < EXACT
    assert (tiled.decode(latents) - decoded).abs().max() < EXACT
    assert tiled.scale_factor == codec.scale_factor and tiled.scaling_factor == codec.scaling_factor


def test_tiled_vae_exact_statistics_match_untiled_beyond_stats_size(codec):
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    tiled = TiledVaeCodec(codec, TILE, OVERLAP, PADDING, stats_size=16, statistics="exact")
    with torch.no_grad():
        latents = codec.encode(image)
        decoded = codec.decode(latents)
    assert (tiled.encode(image) - latents).abs().max() < EXACT
    assert (tiled.decode(latents) - decoded).abs().max() < EXACT


def test_tiled_vae_one_tile_is_the_codec(codec):
    image = torch.rand(1, 3, 24, 32)
    tiled = TiledVaeCodec(codec, TILE, OVERLAP, PADDING)
    with torch.no_grad():
        assert torch.equal(tiled.encode(image), codec.encode(image))
        latents = codec.encode(image)
        assert torch.equal(tiled.decode(latents), codec.decode(latents))


def test_tiled_vae_has_no_seams_with_estimated_statistics(codec):
    """With statistics from a scaled-down copy the result moves away from the untiled codec, but all
    tiles share them: the output does not depend on where the tile borders are, so a smooth gradient
    shows no step at a border that a tiling without a border there doesn't show too."""
    image = _gradient()
    with torch.no_grad():
        latents = codec.encode(image)
    small = TiledVaeCodec(codec, TILE, OVERLAP, PADDING, stats_size=TILE)
    large = TiledVaeCodec(codec, 48, 16, PADDING, stats_size=TILE)
    first, second = small.decode(latents), large.decode(latents)
    borders = [start * 2 for start, _ in tile_spans(SIZE // 2, TILE // 2, OVERLAP // 2)[1:]]
    borders += [stop * 2 for _, stop in tile_spans(SIZE // 2, TILE // 2, OVERLAP // 2)[:-1]]
    for column in borders:
        step_first = first[..., column] - first[..., column - 1]
        step_second = second[..., column] - second[..., column - 1]
        assert (step_first - step_second).abs().max() < EXACT
    assert (small.encode(image) - large.encode(image)).abs().max() < EXACT
    # the scaled-down statistics are an estimate: stated tolerance on this random tiny VAE
    with torch.no_grad():
        assert (first - codec.decode(latents)).abs().mean() < 0.05


def test_tiled_vae_runs_high_resolution_layers_on_tiles_only(codec):
    seen = []
    hooks = [
        codec.vae.encoder.down_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2:])),
        codec.vae.decoder.up_blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2:])),
    ]
    try:
        image = torch.rand(1, 3, 64, 128)
        tiled = TiledVaeCodec(codec, TILE, OVERLAP, PADDING)
        latents = tiled.encode(image)
        output = tiled.decode(latents)
    finally:
        for hook in hooks:
            hook.remove()
    assert output.shape == (1, 3, 64, 128) and output.device.type == "cpu"
    # encoder tiles in pixels; the decoder's last up block runs at half resolution (scale factor 2)
    assert max(max(shape) for shape in seen) <= TILE + 2 * PADDING


def test_tiled_vae_rejects_bad_sizes(codec):
    with pytest.raises(ValueError, match="multiple of the VAE scale"):
        TiledVaeCodec(codec, 33, 8, 16)
    with pytest.raises(ValueError, match="overlap"):
        TiledVaeCodec(codec, 32, 32, 16)
    with pytest.raises(ValueError, match="statistics='global'"):
        TiledVaeCodec(codec, 32, 8, 16, statistics="global")
    with pytest.raises(ValueError, match="multiples of 2"):
        TiledVaeCodec(codec, 32, 8, 16).encode(torch.rand(1, 3, 65, 64))


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    return Denoiser(unet, controlnet)


def _inputs(height=24, width=20, batch=2):
    generator = torch.Generator().manual_seed(3)
    z_t = torch.randn(batch, 4, height, width, generator=generator)
    control = torch.rand(batch, 3, height * 2, width * 2, generator=generator)
    t = torch.tensor([999, 499])[:batch]
    return z_t, t, control, Conditioning(torch.randn(batch, 7, 32, generator=generator))


def test_tiled_denoiser_with_one_tile_is_the_denoiser(denoiser):
    z_t, t, control, conditioning = _inputs()
    with torch.no_grad():
        expected = denoiser(z_t, t, control, conditioning)
        got = TiledDenoiser(denoiser, 24, 4, tile_batch_size=2, weight_sigma=0.1)(
            z_t, t, control, conditioning
        )
    assert torch.equal(got, expected)


def test_tiled_denoiser_tile_batching_does_not_change_eps(denoiser):
    z_t, t, control, conditioning = _inputs()
    with torch.no_grad():
        one = TiledDenoiser(denoiser, 16, 4, tile_batch_size=1, weight_sigma=0.1)(
            z_t, t, control, conditioning
        )
        three = TiledDenoiser(denoiser, 16, 4, tile_batch_size=3, weight_sigma=0.1)(
            z_t, t, control, conditioning
        )
    assert one.shape == z_t.shape and torch.isfinite(one).all()
    assert (one - three).abs().max() < EXACT


class PointwiseDenoiser(nn.Module):
    """A denoiser whose eps at a latent cell depends only on that cell, its control pixels, t and the
    sample's conditioning: tiling must then reproduce it exactly (tests the cutting and blending)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.latent_mix = nn.Parameter(torch.randn(4, 4, generator=generator))
        self.control_mix = nn.Parameter(torch.randn(4, 3, generator=generator))

    def forward(self, z_t, t, control_image, conditioning):
        factor = control_image.shape[-1] // z_t.shape[-1]
        control = F.avg_pool2d(control_image, factor)
        eps = torch.einsum("oc,bchw->bohw", self.latent_mix, z_t)
        eps = eps + torch.einsum("oc,bchw->bohw", self.control_mix, control)
        return eps + (t.float() / 1000 + conditioning.text_embeds.mean((1, 2))).view(-1, 1, 1, 1)


def test_tiled_denoiser_cuts_and_blends_consistently():
    model = PointwiseDenoiser()
    z_t, t, control, conditioning = _inputs(height=40, width=36)
    expected = model(z_t, t, control, conditioning)
    for tile, overlap, batch_size in [(16, 4, 1), (16, 8, 4), (24, 2, 2)]:
        tiled = TiledDenoiser(model, tile, overlap, tile_batch_size=batch_size, weight_sigma=0.1, align=2)
        assert (tiled(z_t, t, control, conditioning) - expected).abs().max() < EXACT


def test_gaussian_weights_and_errors(denoiser):
    weights = gaussian_weights(8, 6, 0.1)
    assert weights.shape == (8, 6) and weights.min() > 0
    assert torch.allclose(weights, weights.flip(0)) and torch.allclose(weights, weights.flip(1))
    with pytest.raises(ValueError, match="multiple of 2"):
        TiledDenoiser(denoiser, 15, 4, tile_batch_size=1, weight_sigma=0.1)
    z_t, t, control, conditioning = _inputs()
    tiled = TiledDenoiser(denoiser, 16, 4, tile_batch_size=1, weight_sigma=0.1)
    with pytest.raises(ValueError, match="control image"):
        tiled(z_t, t, control[..., :-1], conditioning)
