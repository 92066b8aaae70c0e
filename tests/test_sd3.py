"""The SD3 adapter's own parts on `model=sd3_tiny`: latent control, packed prompt, RAM's representation in
the joint-attention context, the loader and its errors (the README flow: tests/test_backbones.py)."""

import pytest
import torch
from hydra.utils import instantiate

from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.method.module import AddSRModule
from addsr_pl.models.backbones.sd3 import (
    SD3_LAYOUT,
    load_sd3_components,
    pack_prompt,
    unpack_prompt,
)
from addsr_pl.models.conditioning import Conditioning
from addsr_pl.models.diffusion import MissingWeightsError
from addsr_pl.train import train

from conftest import compose_train, to_dicts

SD3 = ["model=sd3_tiny", "data.crop_size=32", "data.batch_size=2", "trainer.limit_val_batches=0"]


@pytest.fixture(scope="module")
def module(tmp_path_factory, cache_dir):
    return AddSRModule(**to_dicts(compose_train(tmp_path_factory.mktemp("sd3"), SD3, cache_dir)))


def test_the_control_enters_as_a_latent_and_the_prompt_packs_its_pooled_projection(module):
    tokens, pooled = torch.randn(2, 5, 64), torch.randn(2, 96)
    packed = pack_prompt(tokens, pooled)
    assert packed.shape == (2, 7, 64)  # 96 pooled values in ceil(96 / 64) = 2 tokens
    back_tokens, back_pooled = unpack_prompt(packed, 96)
    assert torch.equal(back_tokens, tokens) and torch.equal(back_pooled, pooled)
    embeds = module.conditioner.prompt_encoder.encode(["a cat"])
    width = module.teacher.transformer.config.joint_attention_dim
    assert embeds.shape == (1, 16 + 256 + 1, width)  # CLIP tokens, T5 tokens, one token of pooled (64)
    z = torch.randn(1, 8, 4, 4)
    t = torch.tensor([500.0])
    control = torch.rand(1, 3, 32, 32)
    cond = module.conditioner.condition(control)
    with torch.no_grad():
        a = module.teacher(z, t, control, cond)
        b = module.teacher(z, t, control.flip(-1), cond)
    assert a.shape == z.shape and not torch.allclose(a, b)  # the ControlNet reads its control


def test_rams_representation_joins_the_joint_attention_context(cache_dir, tmp_path):
    ram = [*SD3, "conditioning=tiny_ram", "conditioning.representation_in_context=true"]
    result = train(compose_train(tmp_path / "ram", [*ram, "trainer.max_steps=1"], cache_dir))
    module = result["module"]
    assert module.conditioner.use_representation
    control = torch.rand(1, 3, 32, 32)
    cond = module.conditioner.condition(control)
    assert cond.image_embeds is not None and cond.image_embeds.shape[-1] == 16
    z, t = torch.randn(1, 8, 4, 4), torch.tensor([500.0])
    with torch.no_grad():
        with_representation = module.teacher(z, t, control, cond)
        without = module.teacher(z, t, control, Conditioning(cond.text_embeds))
    assert not torch.allclose(with_representation, without)
    assert AddSRPipeline.from_folder(result["student"]).conditioner.use_representation
    # off, the tagger gives tags only
    plain = AddSRModule(
        **to_dicts(compose_train(tmp_path / "tags", [*SD3, "conditioning=tiny_ram"], cache_dir))
    )
    assert not plain.conditioner.use_representation


def test_representation_in_context_is_refused_where_it_cannot_work(cache_dir, tmp_path):
    no_tagger = compose_train(
        tmp_path / "a", [*SD3, "conditioning.representation_in_context=true"], cache_dir
    )
    with pytest.raises(ValueError, match="needs a tagger for the representation"):
        AddSRModule(**to_dicts(no_tagger))
    sd2 = compose_train(
        tmp_path / "b", ["conditioning=tiny_ram", "conditioning.representation_in_context=true"], cache_dir
    )
    with pytest.raises(ValueError, match="SD2 takes the representation through SeeSR's"):
        AddSRModule(**to_dicts(sd2))


def test_the_loader_names_every_missing_file_and_the_key(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError) as error:
        load_sd3_components(str(tmp_path), {}, 1)
    message = str(error.value)
    assert "\n" not in message and "model.components.pretrained_path" in message
    assert "text_encoder_3/config.json" in message and "tokenizer_2/tokenizer_config.json" in message
    assert "transformer/config.json" not in message


def test_the_loader_reads_a_diffusers_sd3_folder(tmp_path, cache_dir):
    cfg = compose_train(tmp_path / "cfg", SD3, cache_dir)
    components = instantiate(cfg.model.components, _convert_="all")
    folder = tmp_path / "sd3"
    for name in SD3_LAYOUT:
        getattr(components, name).save_pretrained(folder / name)
    reference = dict(cfg.model.components.reference_scheduler)
    loaded = load_sd3_components(str(folder), reference, 1)
    for name in ("transformer", "vae", "text_encoder_3"):
        theirs, ours = getattr(components, name).state_dict(), getattr(loaded, name).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs), name
    # a fresh ControlNet: the transformer's first block, its control embedding zero (a no-op at start)
    first = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(loaded.controlnet.state_dict()[first], loaded.transformer.state_dict()[first])
    assert not loaded.controlnet.pos_embed_input.proj.weight.any()
    assert loaded.transformer.config.num_layers == components.transformer.config.num_layers
    assert loaded.sources["transformer"] == str(folder) and loaded.sources["controlnet"] is None
