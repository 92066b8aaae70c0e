"""The FLUX.1 adapter's own parts on `model=flux_tiny`: 2 x 2 packing and rotary ids as diffusers' FLUX
pipeline lays them out, sigma and the guidance scale as the networks' inputs, the control as a packed
latent, a representation in the context, the LoRA student sharing the teacher's weights, the loader and
its errors (the README flow: tests/test_backbones.py)."""

import pytest
import torch
from diffusers import FluxControlNetModel, FluxPipeline
from hydra.utils import instantiate

from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.method.module import AddSRModule
from addsr_pl.models.backbones.flux import (
    FLUX_LAYOUT,
    image_ids,
    load_flux_components,
    pack_latents,
    unpack_latents,
)
from addsr_pl.models.backbones.sd3 import unpack_prompt
from addsr_pl.models.conditioning import Conditioning
from addsr_pl.models.diffusion import MissingWeightsError
from addsr_pl.train import train

from conftest import compose_train, to_dicts

FLUX = ["model=flux_tiny", "data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]


@pytest.fixture(scope="module")
def module(tmp_path_factory, cache_dir):
    return AddSRModule(**to_dicts(compose_train(tmp_path_factory.mktemp("flux"), FLUX, cache_dir)))


def test_packing_and_ids_are_diffusers_flux_layout():
    latents = torch.randn(2, 4, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # diffusers' unpack takes the image size in pixels (VAE factor 8)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), latents)
    expected = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10, torch.device("cpu"), torch.float32), expected)
    with pytest.raises(ValueError, match="not even"):
        pack_latents(torch.randn(1, 4, 5, 6))


def networks_inputs(module):
    """Records what the teacher's transformer and ControlNet are given (their embeddings' inputs)."""
    seen = {}
    teacher = module.teacher

    def record(name):
        return lambda _, args: seen.setdefault(name, args)

    hooks = [
        teacher.transformer.time_text_embed.register_forward_pre_hook(record("time")),
        teacher.controlnet.controlnet_x_embedder.register_forward_pre_hook(record("control")),
    ]
    return seen, hooks


def test_sigma_guidance_and_a_packed_control_latent_reach_the_networks(module):
    control = torch.rand(2, 3, 32, 32)
    cond = module.conditioner.condition(control)
    guidance = module.hparams["conditioning"]["guidance_scale"]
    pooled_dim = module.teacher.transformer.config.pooled_projection_dim
    _, pooled = unpack_prompt(cond.text_embeds, pooled_dim + 1)
    assert torch.all(pooled[:, pooled_dim] == guidance)  # the guidance scale travels after the pooled output
    z, sigma = torch.randn(2, 4, 4, 4), torch.tensor([0.25, 0.75])
    seen, hooks = networks_inputs(module)
    try:
        with torch.no_grad():
            velocity = module.teacher(z, module.noise_schedule.model_timestep(sigma), control, cond)
    finally:
        for hook in hooks:
            hook.remove()
    assert velocity.shape == z.shape
    # the networks are fed sigma and multiply it (and the guidance) by 1000 themselves
    timestep, guidance_seen = seen["time"][:2]
    torch.testing.assert_close(timestep, sigma * 1000)
    torch.testing.assert_close(guidance_seen, torch.full((2,), guidance * 1000.0))
    # the control enters as the codec's latent of the control image, packed as the noisy latent is
    torch.testing.assert_close(seen["control"][0], pack_latents(module.codec.encode(control)))
    with torch.no_grad():
        other_guidance = cond.text_embeds.clone()
        other_guidance[:, -2:] = 0  # the pooled output's last values and the guidance scale
        flipped = module.teacher(z, sigma * 1000, control.flip(-1), cond)
        unguided = module.teacher(z, sigma * 1000, control, Conditioning(other_guidance))
    assert not torch.allclose(velocity, flipped)  # the ControlNet reads its control
    assert not torch.allclose(velocity, unguided)


def test_a_guidance_distilled_transformer_needs_its_guidance_scale(cache_dir, tmp_path):
    cfg = compose_train(tmp_path, [*FLUX, "conditioning.guidance_scale=null"], cache_dir)
    with pytest.raises(ValueError, match="conditioning.guidance_scale = null"):
        AddSRModule(**to_dicts(cfg))


def test_the_lora_student_holds_the_teachers_weights_once(cache_dir, tmp_path, sample_pair):
    # a large step and no averaging, so the merged adapters change what the exported student gives
    lora_run = ["method.trainable=lora", "method.optimizer_g.lr=0.05", "method.ema_decay=0"]
    cfg = compose_train(tmp_path, [*FLUX, *lora_run, "trainer.max_steps=1"], cache_dir)
    result = train(cfg)
    lora = result["module"]
    student = dict(lora.student.named_parameters())
    teacher_ids = {id(p) for p in lora.teacher.parameters()}
    own = [name for name, p in student.items() if id(p) not in teacher_ids]
    # the teacher is the frozen base: every weight of it is the student's own base weight, the same
    # object, and the student adds only its LoRA adapters, which are what trains
    assert teacher_ids <= {id(p) for p in student.values()}
    assert own and all("lora_" in name for name in own)
    assert {name for name, _ in lora.student_trainable()} == set(own)
    assert not any("lora_" in name for name, _ in lora.teacher.named_parameters())
    # the exported student (adapters merged) is the trained one
    _, lr = sample_pair
    with lora.ema.swapped_in():
        expected = lora.student_pipeline(4)(lr, steps=2, generator=torch.Generator().manual_seed(3))
    got = AddSRPipeline.from_folder(result["student"])(
        lr, steps=2, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_loader_names_every_missing_file_and_the_key(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError) as error:
        load_flux_components(str(tmp_path), {}, 1, 1)
    message = str(error.value)
    assert "\n" not in message and "model.components.pretrained_path" in message
    assert "text_encoder_2/config.json" in message and "tokenizer_2/tokenizer_config.json" in message
    assert "scheduler/scheduler_config.json" in message and "transformer/config.json" not in message


def test_the_loader_reads_a_diffusers_flux_folder(tmp_path, cache_dir):
    cfg = compose_train(tmp_path / "cfg", FLUX, cache_dir)
    components = instantiate(cfg.model.components, _convert_="all")
    folder = tmp_path / "flux"
    for name in FLUX_LAYOUT:
        getattr(components, name).save_pretrained(folder / name)
    reference = dict(cfg.model.components.reference_scheduler)
    loaded = load_flux_components(str(folder), reference, 1, 1)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        theirs, ours = getattr(components, name).state_dict(), getattr(loaded, name).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs), name
    # a fresh ControlNet of the transformer's own width: its first blocks, the control embedding zero
    controlnet = loaded.controlnet.state_dict()
    for first in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight"):
        assert torch.equal(controlnet[first], loaded.transformer.state_dict()[first])
    assert not loaded.controlnet.controlnet_x_embedder.weight.any()
    assert loaded.sources["transformer"] == str(folder) and loaded.sources["controlnet"] is None


def test_the_loader_refuses_a_controlnet_that_reads_another_control(tmp_path, cache_dir):
    cfg = compose_train(tmp_path / "cfg", FLUX, cache_dir)
    components = instantiate(cfg.model.components, _convert_="all")
    for name in FLUX_LAYOUT:
        getattr(components, name).save_pretrained(tmp_path / "flux" / name)
    config = {k: v for k, v in components.controlnet.config.items() if not k.startswith("_")}
    xlabs = FluxControlNetModel(**{**config, "conditioning_embedding_channels": 16})
    xlabs.save_pretrained(tmp_path / "xlabs" / "controlnet")
    reference = dict(cfg.model.components.reference_scheduler)
    with pytest.raises(MissingWeightsError, match="XLabs-style") as error:
        load_flux_components(str(tmp_path / "flux"), reference, 1, 1, controlnet_path=str(tmp_path / "xlabs"))
    assert "model.components.controlnet_path" in str(error.value) and "\n" not in str(error.value)


def test_a_representation_joins_the_context_after_the_prompt(module, cache_dir, tmp_path):
    control = torch.rand(1, 3, 32, 32)
    cond = module.conditioner.condition(control)
    z, t = torch.randn(1, 4, 4, 4), torch.tensor([500.0])
    representation = torch.randn(1, 3, 16)  # narrower than the 32-wide context: zero-padded to it
    with torch.no_grad():
        plain = module.teacher(z, t, control, cond)
        joined = module.teacher(z, t, control, Conditioning(cond.text_embeds, representation))
    assert not torch.allclose(plain, joined)
    cfg = compose_train(tmp_path, [*FLUX, "conditioning.representation_in_context=true"], cache_dir)
    with pytest.raises(ValueError, match="needs a tagger for the representation"):
        AddSRModule(**to_dicts(cfg))
