"""Prompt ids built on the device (`models.prompt_ids`) equal the tokenizer's ids of the composed text:
for every tag alone and for random tag sets (truncated ones included), both prompt joins, per-image
manual prompts, with CLIP's real BPE vocabulary (open_clip ships it) and the tiny presets' tokenizer."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from torch import nn
from transformers import CLIPTokenizer

from addsr_pl.models.conditioning import PART_SEPARATOR, PromptEncoder
from addsr_pl.models.diffusion import character_tokenizer
from addsr_pl.models.prompt_ids import PromptIds

POSITIVE = "clean, high-resolution, 8k, extremely detailed, best quality, sharp"
MANUALS = ["", "a photo of an old town", "(blurry) 50's poster,", "Ünïcode café & co."]

# A RAM-like vocabulary: single and multi-word, hyphens, apostrophes, digits, capitals, and tags that
# end (or start) with punctuation, which CLIP's pre-tokenizer merges with the separator's comma.
OBJECTS = [
    "cat", "dog", "tree", "sky", "3D CG rendering", "t-shirt", "jack-o'-lantern", "rock 'n' roll",
    "mother's day", "new year's eve", "u.s. flag", "st. patrick's day", "c++", "what?", "wow!",
    "a.m.", "(parenthesis)", "#hashtag", "50's style", "1990s", "7-eleven", "x-ray", "e-mail",
    "don't walk sign", "o'clock", "rock'", "'quote", "...", "--", "&", "b&w photo", "mid-century",
    "coca-cola", "wi-fi", "k-pop", "2 people", "100 dollar bill", "4x4", "f-16", "r2-d2",
    "hello kitty", "teddy bear", "fire hydrant", "traffic light", "stop sign", "parking meter",
    "baseball bat", "tennis racket", "wine glass", "hot dog", "potted plant", "cell phone",
    "hair drier", "toothbrush", "mountain", "river", "ocean", "beach", "sand", "snow", "rain",
    "sunset", "sunrise", "cloud", "fog", "street", "road", "car", "bus", "truck", "bicycle",
    "motorcycle", "airplane", "boat", "train", "bird", "horse", "sheep", "cow", "elephant", "bear",
    "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "kite", "skateboard", "surfboard", "bottle", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "cake",
    "chair", "couch", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "hair", "face", "smile", "woman", "man", "child", "girl", "boy", "crowd",
    "building", "skyscraper", "bridge", "castle", "church", "temple", "tower", "window", "door",
    "wall", "floor", "ceiling", "lamp", "candle", "flower", "rose", "tulip", "grass", "leaf",
    "forest", "jungle", "desert", "canyon", "waterfall", "lake", "pond", "island", "harbor",
    "Eiffel Tower", "Mt. Fuji", "McDonald's", "iPhone", "T-Rex", "DJ", "UFO", "R&B", "pH meter",
]  # fmt: skip
COLOURS = ["red", "dark-blue", "green", "black and white", "golden", "pink"]
TAGS = OBJECTS + [f"{c} {o}" for c in COLOURS for o in OBJECTS[40:70]]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """SD2's CLIP tokenizer (BPE vocabulary of OpenAI's CLIP, "!" as pad) from open_clip's bundled
    merges, written as vocab.json + merges.txt."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as bpe:
        merges = bpe.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77
    )


@pytest.fixture(scope="module", params=["clip", "characters_16", "characters_77"])
def tokenizer(request, tmp_path_factory):
    if request.param == "clip":
        return request.getfixturevalue("clip_tokenizer")
    length = int(request.param.split("_")[1])
    return character_tokenizer(tmp_path_factory.mktemp("characters"), length)


def encoder(tokenizer, join: str, prompt: str = "tags", positive: str = POSITIVE) -> PromptEncoder:
    return PromptEncoder(nn.Identity(), tokenizer, prompt, positive, "", prompt_join=join)


def expected_ids(tokenizer, prompts: PromptEncoder, tags, mask: torch.Tensor, manual, separator=", "):
    texts = [
        prompts.compose(separator.join(t for t, on in zip(tags, row) if on), m)
        for row, m in zip(mask.tolist(), manual)
    ]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return torch.tensor(ids.input_ids), texts


@pytest.mark.parametrize("join", ["clean", "official"])
def test_every_tag_alone_gives_the_tokenizers_ids(tokenizer, join):
    prompts = encoder(tokenizer, join)
    table = PromptIds(tokenizer, prompts.compose, PART_SEPARATOR, TAGS)
    mask = torch.eye(len(TAGS), dtype=torch.bool).repeat(len(MANUALS), 1)
    manual = [m for m in MANUALS for _ in TAGS]
    expected, _ = expected_ids(tokenizer, prompts, TAGS, mask, manual)
    assert torch.equal(table(mask, *table.frame(manual)), expected)


@pytest.mark.parametrize("join", ["clean", "official"])
@pytest.mark.parametrize("positive", [POSITIVE, ""])
def test_random_tag_sets_give_the_tokenizers_ids(tokenizer, join, positive):
    """Densities from none to all tags, so most rows are truncated to the tokenizer's length and some
    have no tag; an empty positive prompt leaves the clean join's tags last when the manual is empty."""
    prompts = encoder(tokenizer, join, positive=positive)
    table = PromptIds(tokenizer, prompts.compose, PART_SEPARATOR, TAGS)
    g = torch.Generator().manual_seed(0)
    rows = 240
    density = torch.cat([torch.zeros(8), torch.ones(8), torch.rand(rows - 16, generator=g) * 0.15])
    mask = torch.rand(rows, len(TAGS), generator=g) < density[:, None]
    manual = [MANUALS[i % len(MANUALS)] for i in range(rows)]
    expected, texts = expected_ids(tokenizer, prompts, TAGS, mask, manual)
    lengths = [len(ids) for ids in tokenizer(texts).input_ids]
    assert sum(n > tokenizer.model_max_length for n in lengths) > rows // 4  # truncation is covered
    if tokenizer.model_max_length >= 77:  # 16 characters hold no positive prompt
        assert sum(n < tokenizer.model_max_length for n in lengths) >= 4  # and prompts that fit
    assert torch.equal(table(mask, *table.frame(manual)), expected)


def test_another_tag_separator(clip_tokenizer):
    prompts = encoder(clip_tokenizer, "clean")
    table = PromptIds(clip_tokenizer, prompts.compose, PART_SEPARATOR, TAGS, tag_separator=" | ")
    mask = torch.rand(64, len(TAGS), generator=torch.Generator().manual_seed(1)) < 0.02
    manual = [MANUALS[i % len(MANUALS)] for i in range(64)]
    expected, _ = expected_ids(clip_tokenizer, prompts, TAGS, mask, manual, separator=" | ")
    assert torch.equal(table(mask, *table.frame(manual)), expected)


@pytest.mark.parametrize("prompt", ["fixed", "manual", "none"])
@pytest.mark.parametrize("join", ["clean", "official"])
def test_prompts_without_tags(clip_tokenizer, prompt, join):
    prompts = encoder(clip_tokenizer, join, prompt=prompt)
    table = PromptIds(clip_tokenizer, prompts.compose, PART_SEPARATOR)
    manual = MANUALS + ["a long manual prompt " * 20]
    no_tags = torch.zeros(len(manual), 1, dtype=torch.bool)
    expected, _ = expected_ids(clip_tokenizer, prompts, [""], no_tags, manual)
    assert torch.equal(table(None, *table.frame(manual)), expected)


def test_separators_that_merge_with_the_tags_and_empty_tags_are_refused(clip_tokenizer):
    prompts = encoder(clip_tokenizer, "clean")
    with pytest.raises(ValueError, match="tag_separator = ',' does not end with a space"):
        PromptIds(clip_tokenizer, prompts.compose, PART_SEPARATOR, TAGS, tag_separator=",")
    with pytest.raises(ValueError, match="tag 1 of the tag list is empty"):
        PromptIds(clip_tokenizer, prompts.compose, PART_SEPARATOR, ["cat", "", "dog"])


def test_a_tokenizer_that_does_not_cut_at_whitespace_is_refused(clip_tokenizer):
    """A tokenizer whose pieces cross spaces (here: CLIP's with whitespace kept as a character) would
    give other ids to the joined text than to its tags one by one."""
    from tokenizers import pre_tokenizers

    tokenizer = CLIPTokenizer(clip_tokenizer.get_vocab(), [], pad_token="!", model_max_length=77)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    prompts = encoder(tokenizer, "clean")
    with pytest.raises(ValueError, match="does not split tag prompts at whitespace"):
        PromptIds(tokenizer, prompts.compose, PART_SEPARATOR, ["cat", "dog"])


def test_the_ids_are_one_graph_without_host_syncs(clip_tokenizer):
    """No `.tolist()`, `.item()` or data-dependent shape: dynamo traces the call whole."""
    prompts = encoder(clip_tokenizer, "official")
    table = PromptIds(clip_tokenizer, prompts.compose, PART_SEPARATOR, TAGS)
    mask = torch.rand(2, len(TAGS), generator=torch.Generator().manual_seed(2)) < 0.05
    explanation = torch._dynamo.explain(table)(mask, *table.frame(["", "x"]))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.fixture(scope="module")
def seesr_pipeline(tmp_path_factory):
    from test_speed import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("cache"))


def per_image(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize(
    ("join", "tagger_input", "manual"),
    [("clean", "upscaled", None), ("official", "lr_bilinear", ["", "a (manual) prompt,", "x-ray"])],
)
def test_the_call_with_prompts_on_the_device_equals_the_host_path(seesr_pipeline, join, tagger_input, manual):
    """`__call__` (RAM, tag mask, ids and text encoder inside `sampled_image`) gives bit for bit the
    images of `run`, whose prompts go through strings, the tokenizer and the embedding cache."""
    conditioner = seesr_pipeline.conditioner
    assert seesr_pipeline._whole_call()[0] == seesr_pipeline.sampled_image
    conditioner.prompt_encoder.prompt_join, conditioner.inference_tagger_input = join, tagger_input
    try:
        # black, white, blue: three tag sets of the tiny RAM; the last two share one text, which the
        # host path encodes once
        colours = torch.tensor([[0.0, 0, 0], [1, 1, 1], [0, 0, 1], [0, 0, 1]]).view(4, 3, 1, 1)
        texture = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        lr = (colours + 0.1 * texture).clamp(0, 1)
        fast = seesr_pipeline(
            lr, steps=2, generator=per_image(4), manual_prompt=manual and [*manual, "x-ray"]
        )
        steps = seesr_pipeline.run(
            lr, steps=2, generator=per_image(4), manual_prompt=manual and [*manual, "x-ray"]
        )
        texts = conditioner.texts(conditioner.first_step_image(lr, upscale_for(seesr_pipeline, lr)))
        assert len(set(texts[:3])) > 1  # the batch mixes tag sets
    finally:
        conditioner.prompt_encoder.prompt_join, conditioner.inference_tagger_input = "clean", "upscaled"
    assert torch.equal(fast, steps[-1].x0_image)


def upscale_for(pipeline, lr):
    return pipeline._inputs(lr, 1, None, None)[0]


def test_the_call_with_a_fixed_prompt_equals_the_host_path(tmp_path):
    from test_speed import tiny_pipeline

    pipeline = tiny_pipeline(tmp_path, seesr=False)
    assert pipeline._whole_call()[0] == pipeline.sampled_image and pipeline.conditioner.tagger is None
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    fast = pipeline(lr, steps=2, generator=per_image(2))
    assert torch.equal(fast, pipeline.run(lr, steps=2, generator=per_image(2))[-1].x0_image)


def test_conditioning_on_the_device_equals_the_host_conditioning(seesr_pipeline):
    conditioner = seesr_pipeline.conditioner
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    manual = ["", "a manual prompt", "3D"]
    host = conditioner.condition(images, manual)
    device = conditioner.condition_on_device(images, *conditioner.prompt_frame(3, manual))
    assert torch.equal(device.text_embeds, host.text_embeds)
    assert torch.equal(device.image_embeds, host.image_embeds)


@pytest.mark.slow
def test_the_whole_call_with_its_conditioning_compiles_to_one_graph(seesr_pipeline):
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    inputs = seesr_pipeline._device_inputs(lr, 2, per_image(1), None)
    with torch.no_grad():
        explanation = torch._dynamo.explain(seesr_pipeline.sampled_image)(inputs, (0.4, None))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
