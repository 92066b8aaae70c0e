"""OpenCLIP tagger on a tiny OpenCLIP model registered from a config dict; prompt strings."""

import json

import open_clip
import pytest
import torch

from addsr_pl.models.tagger import OpenCLIPTagger, Tagger

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
VOCABULARY = ["cat", "dog", "tree", "sky", "car", "house"]
TAGGER_ARGS = dict(
    representation_dim=24,
    top_k=3,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
    interpolation="bicubic",
    antialias=True,
    projection_seed=0,
    tag_separator=", ",
)


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory):
    """A tiny OpenCLIP architecture registered by name, with its weights in a local file."""
    folder = tmp_path_factory.mktemp("openclip")
    (folder / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "tiny-test-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    torch.save(model.state_dict(), folder / "tiny.pt")
    return folder / "tiny.pt"


def tiny_tagger(weights, threshold=0.0, **overrides):
    args = {**TAGGER_ARGS, "threshold": threshold, **overrides}
    return OpenCLIPTagger.from_local("tiny-test-clip", weights, VOCABULARY, **args)


def images(batch=2, seed=1):
    return torch.rand(batch, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def test_tagger_openclip_gives_tags_and_a_representation(tiny_clip_weights):
    tagger = tiny_tagger(tiny_clip_weights)
    assert isinstance(tagger, Tagger)
    out = tagger(images())
    assert len(out.tags) == 2
    assert out.representation.shape == (2, 1 + 4 * 4, 24)  # class token + a 4x4 patch grid
    assert torch.equal(tagger.representation(images()), out.representation)
    for tags in out.tags:  # threshold 0: every image gets its top_k words
        assert len(tags.split(", ")) == 3 and set(tags.split(", ")) <= set(VOCABULARY)


def test_tagger_openclip_thresholds_and_top_k_select_the_words(tiny_clip_weights):
    tagger = tiny_tagger(tiny_clip_weights, top_k=6)
    x = images(batch=1)
    pooled = tagger.model.visual(tagger._pixels(x))
    probabilities = tagger.tag_probabilities(pooled)[0]
    order = probabilities.argsort(descending=True).tolist()
    between = (probabilities[order[1]] + probabilities[order[2]]).item() / 2  # exactly two words above it
    assert tiny_tagger(tiny_clip_weights, threshold=between, top_k=6)(x).tags == [
        f"{VOCABULARY[order[0]]}, {VOCABULARY[order[1]]}"
    ]
    assert tiny_tagger(tiny_clip_weights, threshold=0.0, top_k=1)(x).tags == [VOCABULARY[order[0]]]
    assert tiny_tagger(tiny_clip_weights, threshold=1.0)(x).tags == [""]


def test_tagger_openclip_projection_is_fixed_orthogonal(tiny_clip_weights):
    down = tiny_tagger(tiny_clip_weights, representation_dim=8).representation_proj.weight
    assert torch.allclose(down @ down.T, torch.eye(8), atol=1e-5)
    up = tiny_tagger(tiny_clip_weights, representation_dim=48).representation_proj.weight
    assert torch.allclose(up.T @ up, torch.eye(32), atol=1e-5)
    again = tiny_tagger(tiny_clip_weights, representation_dim=8).representation_proj.weight
    assert torch.equal(down, again)  # reproducible from the seed
    assert not any(p.requires_grad for p in tiny_tagger(tiny_clip_weights).parameters())


def test_tagger_openclip_reads_only_local_weights(tmp_path):
    missing = tmp_path / "open_clip_model.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        OpenCLIPTagger.from_local("ViT-B-32", missing, VOCABULARY, threshold=0.5, **TAGGER_ARGS)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "words.txt")):
        OpenCLIPTagger.from_local(
            "ViT-B-32", missing.parent / "x", tmp_path / "words.txt", threshold=0.5, **TAGGER_ARGS
        )


def test_tagger_openclip_vocabulary_from_a_file(tiny_clip_weights, tmp_path):
    (tmp_path / "words.txt").write_text("\n".join(VOCABULARY) + "\n\n")
    tagger = OpenCLIPTagger.from_local(
        "tiny-test-clip", tiny_clip_weights, tmp_path / "words.txt", threshold=0.0, **TAGGER_ARGS
    )
    assert tagger.vocabulary == VOCABULARY


def test_openclip_prompts_stay_on_the_host(tiny_clip_weights, tmp_path):
    """OpenCLIP orders its tags by score, not by vocabulary: no on-device prompt ids, the string path."""
    from torch import nn

    from addsr_pl.models.conditioning import Conditioner, PromptEncoder
    from addsr_pl.models.diffusion import character_tokenizer

    prompts = PromptEncoder(nn.Identity(), character_tokenizer(tmp_path, 77), "tags", "clean", "")
    conditioner = Conditioner(prompts, tiny_tagger(tiny_clip_weights))
    assert not conditioner.device_prompts
    assert conditioner.texts(images())[0].endswith(", clean")
