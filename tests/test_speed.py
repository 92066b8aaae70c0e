"""Speed paths of inference: graph breaks, one tagger pass, batching, speed settings, graphs, compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from addsr_pl.core.noise_schedule import noise_schedule_from
from addsr_pl.core.sampler import Denoiser
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.inference.speed import SpeedSettings, exported_defaults, signature, speed_settings
from addsr_pl.models.conditioning import Conditioner, Conditioning
from addsr_pl.models.psr_decoder import PsrDecoder, build_tiny_autoencoder
from addsr_pl.models.vae import VaeCodec
from addsr_pl.paths import config_dir


def tiny_pipeline(cache_dir, seesr: bool = True, psr_decoder: bool = False) -> AddSRPipeline:
    overrides = ["model=tiny_seesr", "conditioning=tiny_ram"] if seesr else ["model=tiny"]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.cache_dir={cache_dir}"])
    parts = instantiate(OmegaConf.to_container(cfg.model.components, resolve=True), _convert_="all")
    conditioning = OmegaConf.to_container(cfg.conditioning, resolve=True)
    codec = VaeCodec(parts.vae).eval()
    decoder = None
    if psr_decoder:
        torch.manual_seed(0)
        decoder = PsrDecoder(build_tiny_autoencoder(codec.scale_factor, 4, 8, 1)).eval()
    return AddSRPipeline(
        Denoiser(parts.unet, parts.controlnet).eval(),
        codec,
        Conditioner.from_config(parts.text_encoder, parts.tokenizer, parts.unet, conditioning).eval(),
        noise_schedule_from(parts.scheduler, "student"),
        list(cfg.method.student_timesteps),
        psr=True,
        psr_weight=float(cfg.method.inference_psr_weight),
        scale=4,
        psr_decoder=decoder,
    )


@pytest.fixture(scope="module")
def seesr_pipeline(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("cache"))


def sampler_inputs(pipeline: AddSRPipeline, steps: int, batch: int = 1, seed: int = 0) -> list:
    lr = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    lr_up, text, representation, timesteps, posterior_noise, noises = pipeline._inputs(
        lr, steps, torch.Generator().manual_seed(seed), None
    )
    return [lr_up, text, representation, timesteps, posterior_noise, *noises]


def test_seesr_denoiser_step_compiles_to_one_graph(seesr_pipeline):
    inputs = sampler_inputs(seesr_pipeline, 1)
    lr_up, text, representation = inputs[:3]
    f = seesr_pipeline.codec.scale_factor
    z = torch.randn(1, seesr_pipeline.latent_channels, lr_up.shape[-2] // f, lr_up.shape[-1] // f)
    explanation = torch._dynamo.explain(seesr_pipeline.denoiser)(
        z, torch.tensor([999]), lr_up, Conditioning(text, representation)
    )
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_whole_seesr_sampler_compiles_to_one_graph(seesr_pipeline):
    """Two steps cover everything a longer call repeats: step 2's tagger pass on the PSR control image."""
    with torch.no_grad():
        explanation = torch._dynamo.explain(seesr_pipeline.final_image)(
            sampler_inputs(seesr_pipeline, 2), (0.4, None)
        )
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def count_encoder_passes(pipeline: AddSRPipeline) -> list[int]:
    calls = [0]
    encoder = pipeline.conditioner.tagger.ram.visual_encoder

    def count(module, args, output):
        calls[0] += 1

    encoder.register_forward_hook(count)
    return calls


@pytest.mark.parametrize("steps", [1, 4])
def test_one_tagger_pass_per_image_and_step(tmp_path, steps):
    pipeline = tiny_pipeline(tmp_path)
    calls = count_encoder_passes(pipeline)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pipeline(lr, steps=steps, generator=torch.Generator().manual_seed(0))
    assert calls[0] == steps


def test_one_pass_conditioning_equals_the_separate_calls(seesr_pipeline):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    conditioner = seesr_pipeline.conditioner
    both = conditioner.condition(images)
    assert torch.equal(both.text_embeds, conditioner.text_embeds(images))
    assert torch.equal(both.image_embeds, conditioner.represent(images))


def test_the_fast_call_and_the_step_by_step_run_agree(seesr_pipeline):
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    fast = seesr_pipeline(lr, steps=2, generator=torch.Generator().manual_seed(0))
    steps = seesr_pipeline.run(lr, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, steps[-1].x0_image)


def test_per_image_generators_make_results_independent_of_the_batch(seesr_pipeline):
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))

    def generators(n):
        return [torch.Generator().manual_seed(7) for _ in range(n)]

    batched = seesr_pipeline(lr, steps=2, generator=generators(2))
    alone = torch.cat([seesr_pipeline(lr[i : i + 1], steps=2, generator=generators(1)) for i in range(2)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        seesr_pipeline(lr, steps=1, generator=generators(3))


def test_the_small_psr_decoder_feeds_only_the_intermediate_control_images(tmp_path):
    pipeline = tiny_pipeline(tmp_path, psr_decoder=True)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    vae = pipeline.run(lr, steps=3, generator=torch.Generator().manual_seed(0), psr_decoder="vae")
    tiny = pipeline.run(lr, steps=3, generator=torch.Generator().manual_seed(0), psr_decoder="tiny")
    assert torch.equal(vae[0].control_image, tiny[0].control_image)  # step 1 reads the LR alone
    assert not torch.allclose(vae[1].control_image, tiny[1].control_image)
    x0 = tiny[0].x0_latent
    w = pipeline.psr_weight
    expected = w * pipeline.psr_decoder.decode(x0).clamp(0, 1) + (1 - w) * vae[0].control_image
    torch.testing.assert_close(tiny[1].control_image, expected[..., :32, :32])
    # the last image is the VAE's decode of the last x0
    last = pipeline.codec.decode(tiny[-1].x0_latent).clamp(0, 1)[..., :32, :32]
    torch.testing.assert_close(tiny[-1].x0_image, last)


def test_psr_decoder_tiny_without_one_names_the_fix(seesr_pipeline):
    with pytest.raises(ValueError, match="stage=psr_decoder"):
        seesr_pipeline(torch.rand(1, 3, 8, 8), steps=2, psr_decoder="tiny")


def test_speed_settings_validate_and_fall_back_to_the_student():
    defaults = exported_defaults()
    speed = speed_settings({"precision": None, "compile": "default"}, defaults)
    assert speed.compile == "default" and speed.precision == defaults["precision"]
    assert (
        SpeedSettings.from_dict({**defaults, "precision": "auto"}).dtype(torch.device("cpu")) == torch.float32
    )
    assert (
        SpeedSettings.from_dict({**defaults, "precision": "auto"}).dtype(torch.device("cuda"))
        == torch.bfloat16
    )
    with pytest.raises(ValueError, match="compile = 'max-autotune'"):
        SpeedSettings.from_dict({**defaults, "compile": "max-autotune"})
    with pytest.raises(ValueError, match="compile_scope"):
        SpeedSettings.from_dict({**defaults, "compile_scope": "everything"})
    with pytest.raises(ValueError, match="precision"):
        speed_settings({}, {k: v for k, v in defaults.items() if k != "precision"})
    cpu = SpeedSettings.from_dict({**defaults, "cuda_graph": True})
    assert not cpu.graphs_on(torch.device("cpu")) and cpu.graphs_on(torch.device("cuda"))
    assert not SpeedSettings.from_dict({**defaults, "compile": "reduce-overhead"}).graphs_on(
        torch.device("cuda")
    )


def test_graph_signatures_separate_size_batch_dtype_and_constants():
    a = torch.zeros(1, 3, 32, 32)
    key = signature([a, None], (0.4, None))
    assert key == signature([torch.ones(1, 3, 32, 32), None], (0.4, None))
    assert key != signature([torch.zeros(2, 3, 32, 32), None], (0.4, None))
    assert key != signature([torch.zeros(1, 3, 64, 32), None], (0.4, None))
    assert key != signature([a.bfloat16(), None], (0.4, None))
    assert key != signature([a, torch.zeros(1)], (0.4, None))
    assert key != signature([a, None], (0.5, None))


@pytest.mark.gpu
def test_cuda_graph_is_captured_once_per_signature_and_matches_eager(tmp_path):
    pipeline = tiny_pipeline(tmp_path)
    defaults = exported_defaults()
    pipeline.with_speed(SpeedSettings.from_dict({**defaults, "precision": "fp32", "compile": "none"}), "cuda")
    graphs = pipeline._graphs
    assert graphs is not None
    images = [torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    outputs = [pipeline(x, steps=2, generator=torch.Generator("cuda").manual_seed(0)) for x in images]
    assert graphs.captures == 1
    pipeline._graphs = None
    eager = [pipeline(x, steps=2, generator=torch.Generator("cuda").manual_seed(0)) for x in images]
    for out, ref in zip(outputs, eager):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    pipeline._graphs = graphs
    pipeline(torch.cat(images[:2]), steps=2, generator=[torch.Generator("cuda").manual_seed(0)] * 2)
    pipeline(images[0], steps=1, generator=torch.Generator("cuda").manual_seed(0))
    assert graphs.captures == 3
    assert outputs[0].data_ptr() != outputs[1].data_ptr()  # outputs are clones, not the graph's buffer


def test_upscale_batches_same_size_images_without_changing_them(tiny_student, tmp_path):
    """`--batch-size 3`: two same-size images share a sampler call, a third size runs alone; every output
    equals the one-at-a-time result, and the failed read does not stop the batch."""
    import numpy as np
    from PIL import Image

    from addsr_pl.upscale import main

    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    for name, size in (("a", (12, 16)), ("b", (12, 16)), ("c", (10, 14))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(src / f"{name}.png")
    (src / "d.png").write_bytes(b"not an image")
    common = ["--model", str(tiny_student), "--steps", "2", "--no-progress"]
    assert main([str(src), "-o", str(tmp_path / "one"), "--batch-size", "1", *common]) == 1
    assert main([str(src), "-o", str(tmp_path / "three"), "--batch-size", "3", *common]) == 1
    for name in "abc":
        one = np.asarray(Image.open(tmp_path / "one" / f"{name}.png")).astype(int)
        three = np.asarray(Image.open(tmp_path / "three" / f"{name}.png")).astype(int)
        assert np.abs(one - three).max() <= 1
    assert not (tmp_path / "three" / "d.png").exists()


def test_the_exported_student_carries_the_speed_defaults(tiny_student):
    import json

    from addsr_pl.core.student_format import MANIFEST

    manifest = json.loads((Path(tiny_student) / MANIFEST).read_text())
    assert manifest["speed"] == exported_defaults()
    pipeline = AddSRPipeline.for_inference(tiny_student, {"precision": "fp32", "channels_last": False}, "cpu")
    assert pipeline.speed.precision == "fp32" and not pipeline.speed.channels_last
    assert pipeline.speed.compile == manifest["speed"]["compile"]
    assert next(pipeline.denoiser.parameters()).dtype == torch.float32


@pytest.mark.parametrize("tagger_input", ["upscaled", "lr_bilinear"])
def test_the_first_step_tagger_input_is_the_upscale_or_the_native_lr_resized_bilinearly(
    seesr_pipeline, tagger_input
):
    conditioner = seesr_pipeline.conditioner
    tagger = conditioner.tagger
    seen = []
    hook = tagger.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    conditioner.inference_tagger_input = tagger_input
    try:
        lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        lr_up = seesr_pipeline._inputs(lr, 1, torch.Generator().manual_seed(0), None)[0]
    finally:
        conditioner.inference_tagger_input = "upscaled"
        hook.remove()
    expected = (
        lr_up
        if tagger_input == "upscaled"
        else torch.nn.functional.interpolate(lr, size=tagger.input_size, mode="bilinear", align_corners=False)
    )
    assert seen[0].shape == expected.shape
    torch.testing.assert_close(seen[0], expected.clamp(0, 1))
