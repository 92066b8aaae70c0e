"""RAM / DAPE on a tiny configuration: shapes, checkpoint loading, DAPE merge, tags through thresholds."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from addsr_pl.models.ram import (
    RAM,
    RAMTagger,
    load_ram_checkpoint,
    merge_dape,
    read_tag_list,
    shifted_window_mask,
)
from addsr_pl.models.tagger import Tagger

TINY_RAM = dict(
    image_size=32,
    patch_size=4,
    embed_dim=16,
    depths=[2, 2],
    num_heads=[2, 4],
    window_size=4,  # stage 0: 8x8 grid, shifted windows; stage 1: 4x4 grid = one window, no shift
    mlp_ratio=4.0,
    swin_norm_eps=1e-5,
    representation_dim=16,
    num_classes=5,
    head_layers=2,
    head_hidden_size=24,
    head_heads=4,
    head_intermediate_size=32,
    head_norm_eps=1e-12,
)
TAGS = ["cat", "dog", "tree", "sky", "3D CG rendering"]
PREPROCESS = dict(
    interpolation="bicubic",
    antialias=False,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
    tag_separator=", ",
)


def tiny_ram(seed=0):
    torch.manual_seed(seed)
    ram = RAM(**TINY_RAM)
    with torch.no_grad():  # label_embed starts at zero (it is loaded from the checkpoint)
        ram.label_embed.normal_()
    return ram.eval()


def images(batch=2, size=40, seed=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_ram_shapes_and_representation():
    ram = tiny_ram()
    pixels = torch.randn(3, 3, 32, 32)
    embeds, logits = ram(pixels)
    assert embeds.shape == (3, 1 + 4 * 4, 16)  # mean token + the last stage's 4x4 grid
    assert logits.shape == (3, 5)
    tokens = ram.visual_encoder(pixels)
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="32x32"):
        ram.visual_encoder(torch.randn(1, 3, 24, 24))


def test_ram_swin_blocks_shift_only_where_the_grid_exceeds_the_window():
    ram = tiny_ram()
    blocks = [b for stage in ram.visual_encoder.layers for b in stage.blocks]
    assert [(b.window, b.shift) for b in blocks] == [(4, 0), (4, 2), (4, 0), (4, 0)]
    assert (
        ram.visual_encoder.layers[0].downsample is not None
        and ram.visual_encoder.layers[1].downsample is None
    )
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    assert torch.isinf(mask[3]).any() and torch.all(mask[3].diagonal() == 0)


def _checkpoint(ram, extra=None):
    state = dict(ram.state_dict())
    state["tag_encoder.encoder.layer.0.output.dense.weight"] = torch.zeros(2, 2)
    state["text_decoder.cls.predictions.bias"] = torch.zeros(3)
    state["visual_encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(
        16, 16, dtype=torch.long
    )
    state.update(extra or {})
    return {"model": state}


def test_ram_checkpoint_loads_and_reports_skipped_parts(tmp_path, caplog):
    source = tiny_ram(seed=3)
    torch.save(_checkpoint(source), tmp_path / "ram.pth")
    target = tiny_ram(seed=4)
    with caplog.at_level(logging.INFO, logger="addsr_pl.models.ram"):
        skipped = load_ram_checkpoint(target, tmp_path / "ram.pth")
    assert skipped == {"tag_encoder": 1, "text_decoder": 1, "recomputed buffers": 1}
    assert "tag_encoder" in caplog.text
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def test_ram_checkpoint_renames_legacy_vision_multi(tmp_path):
    source = tiny_ram(seed=3)
    state = {k.replace("tagging_head", "vision_multi"): v for k, v in source.state_dict().items()}
    torch.save({"model": state}, tmp_path / "ram.pth")
    target = tiny_ram(seed=4)
    load_ram_checkpoint(target, tmp_path / "ram.pth")
    assert torch.equal(
        target.tagging_head.encoder.layer[1].output.dense.weight,
        source.tagging_head.encoder.layer[1].output.dense.weight,
    )


def test_ram_checkpoint_mismatches_fail_clearly(tmp_path):
    ram = tiny_ram()
    state = _checkpoint(ram)["model"]
    del state["fc.bias"]
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="fc.bias"):
        load_ram_checkpoint(tiny_ram(), tmp_path / "missing.pth")
    table = "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"
    torch.save(_checkpoint(ram, {table: torch.zeros(529, 2)}), tmp_path / "window.pth")
    with pytest.raises(ValueError, match="window_size"):
        load_ram_checkpoint(tiny_ram(), tmp_path / "window.pth")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.pth")):
        load_ram_checkpoint(tiny_ram(), tmp_path / "absent.pth")


def _dape(ram, seed=5, rank=8):
    """A DAPE-style LoRA file for `ram`, including parts that tagging does not use."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in ram.named_modules():
        if name.endswith("attn.qkv"):
            dim = module.in_features
            lora[f"{name}.lora_A"] = torch.randn(2 * rank, dim, generator=g)
            lora[f"{name}.lora_B"] = torch.randn(2 * dim, rank, generator=g)
        if name.startswith("tagging_head") and name.endswith(("self.query", "self.key")):
            lora[f"{name}.lora_A"] = torch.randn(rank, module.in_features, generator=g)
            lora[f"{name}.lora_B"] = torch.randn(module.out_features, rank, generator=g)
            tied = name.replace("tagging_head", "tag_encoder")  # the official model ties these layers
            lora[f"{tied}.lora_A"] = torch.randn(rank, module.in_features, generator=g)
            lora[f"{tied}.lora_B"] = torch.randn(module.out_features, rank, generator=g)
    for unused in (
        "tag_encoder.encoder.layer.5.attention.self.query",
        "text_decoder.bert.encoder.layer.0.crossattention.self.key",
    ):
        lora[f"{unused}.lora_A"] = torch.randn(rank, 24, generator=g)
        lora[f"{unused}.lora_B"] = torch.randn(24, rank, generator=g)
    return lora


def test_ram_dape_merge_changes_exactly_the_lora_targets(tmp_path):
    ram = tiny_ram()
    before = {k: v.clone() for k, v in ram.state_dict().items()}
    lora = _dape(ram)
    torch.save(lora, tmp_path / "DAPE.pth")
    counts = merge_dape(ram, tmp_path / "DAPE.pth", lora_alpha=1.0)
    assert counts == {"merged": 4 + 4 + 4, "skipped (not used for tagging)": 2}
    scale = 1.0 / 8  # lora_alpha / r
    expected = dict(before)
    for key in before:
        module = key.removesuffix(".weight")
        if key.endswith("attn.qkv.weight"):
            a, b = lora[f"{module}.lora_A"], lora[f"{module}.lora_B"]
            dim = before[key].shape[1]
            delta = torch.zeros_like(before[key])
            delta[:dim] = b[:dim] @ a[:8] * scale  # query rows
            delta[2 * dim :] = b[dim:] @ a[8:] * scale  # value rows; key rows untouched
            expected[key] = before[key] + delta
        elif key.endswith(("self.query.weight", "self.key.weight")):
            delta = sum(
                lora[f"{m}.lora_B"] @ lora[f"{m}.lora_A"] * scale
                for m in (module, module.replace("tagging_head", "tag_encoder"))
            )
            expected[key] = before[key] + delta
    after = ram.state_dict()
    for key in before:
        assert torch.allclose(after[key], expected[key], atol=1e-5), key
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == {
        k for k in before if k.endswith(("attn.qkv.weight", "self.query.weight", "self.key.weight"))
    }


def test_ram_dape_rejects_a_non_lora_file():
    with pytest.raises(ValueError, match="lora_"):
        merge_dape(tiny_ram(), {"fc.weight": torch.zeros(1, 24)}, lora_alpha=1.0)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        merge_dape(tiny_ram(), {"fc.lora_A": torch.zeros(8, 24)}, lora_alpha=1.0)


def _ram_folder(tmp_path, ram, thresholds):
    torch.save(_checkpoint(ram), tmp_path / "ram_swin_large_14m.pth")
    (tmp_path / "ram_tag_list.txt").write_text("\n".join(TAGS))  # the official file has no final newline
    (tmp_path / "ram_tag_list_threshold.txt").write_text("\n".join(f"{t:.6f}" for t in thresholds) + "\n")


FOLDER_ARGS = dict(
    architecture=TINY_RAM,
    checkpoint="ram_swin_large_14m.pth",
    tag_list="ram_tag_list.txt",
    tag_thresholds="ram_tag_list_threshold.txt",
    lora_alpha=1.0,
)


def test_ram_tagger_fires_the_tags_above_their_thresholds(tmp_path):
    ram = tiny_ram()
    x = images(batch=1)
    probe = RAMTagger(ram, TAGS, [0.5] * 5, **PREPROCESS)
    with torch.no_grad():
        probabilities = torch.sigmoid(ram.tag_logits(ram.image_embeds(probe.preprocess(x))))[0]
    fire = {0, 2, 4}
    thresholds = [p.item() + (-0.01 if i in fire else 0.01) for i, p in enumerate(probabilities)]
    _ram_folder(tmp_path, ram, thresholds)
    tagger = RAMTagger.from_folder(tmp_path, dape=None, **FOLDER_ARGS, **PREPROCESS)
    assert isinstance(tagger, Tagger)
    out = tagger(x)
    assert out.tags == ["cat, tree, 3D CG rendering"]
    assert out.representation.shape == (1, 17, 16) and out.representation.dtype == torch.float32
    assert torch.equal(tagger.representation(x), out.representation)
    assert not any(p.requires_grad for p in tagger.parameters())


def test_ram_tagger_preprocessing_is_resize_clamp_normalise():
    tagger = RAMTagger(tiny_ram(), TAGS, [0.5] * 5, **PREPROCESS)
    x = images(batch=1, size=64)
    expected = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic").clamp(0, 1)
    mean = torch.tensor(PREPROCESS["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS["image_std"]).view(1, 3, 1, 1)
    assert torch.allclose(tagger.preprocess(x), (expected - mean) / std)


def test_ram_tagger_with_dape_from_folder(tmp_path):
    ram = tiny_ram()
    _ram_folder(tmp_path, ram, [0.5] * 5)
    lora = _dape(ram)
    torch.save(lora, tmp_path / "DAPE.pth")
    tagger = RAMTagger.from_folder(tmp_path, dape=tmp_path / "DAPE.pth", **FOLDER_ARGS, **PREPROCESS)
    merged = tiny_ram()
    merge_dape(merged, lora, lora_alpha=1.0)
    for key, value in merged.state_dict().items():
        assert torch.allclose(tagger.ram.state_dict()[key], value), key


def test_ram_tagger_runs_in_bf16(tmp_path):
    ram = tiny_ram()
    x = images()
    reference = RAMTagger(tiny_ram(), TAGS, [0.5] * 5, **PREPROCESS).representation(x)
    tagger = RAMTagger(ram, TAGS, [0.5] * 5, dtype="bfloat16", **PREPROCESS)  # a config gives the name
    assert all(p.dtype == torch.bfloat16 for p in tagger.ram.parameters())
    out = tagger(x)
    assert out.representation.dtype == torch.float32
    assert (out.representation - reference).abs().max() < 0.1 * reference.abs().max()


def test_ram_missing_files_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ram_tag_list.txt")):
        read_tag_list(tmp_path, "ram_tag_list.txt", "ram_tag_list_threshold.txt")
    (tmp_path / "ram_tag_list.txt").write_text("\n".join(TAGS))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ram_tag_list_threshold.txt")):
        read_tag_list(tmp_path, "ram_tag_list.txt", "ram_tag_list_threshold.txt")
    (tmp_path / "ram_tag_list_threshold.txt").write_text("0.5\n0.5\n")
    with pytest.raises(ValueError, match="2 thresholds for 5 tags"):
        read_tag_list(tmp_path, "ram_tag_list.txt", "ram_tag_list_threshold.txt")
    (tmp_path / "ram_tag_list_threshold.txt").write_text("\n".join(["0.5"] * 5))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ram_swin_large_14m.pth")):
        RAMTagger.from_folder(tmp_path, dape=None, **FOLDER_ARGS, **PREPROCESS)
    with pytest.raises(ValueError, match="5 classes but got 4 tags"):
        RAMTagger(tiny_ram(), TAGS[:4], [0.5] * 4, **PREPROCESS)


def test_ram_keeps_its_dtype_under_the_trainers_autocast():
    tagger = RAMTagger(tiny_ram(), TAGS, [0.5] * 5, **PREPROCESS)  # float32
    x = images()
    reference = tagger(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = tagger(x)
    assert torch.equal(under_autocast.representation, reference.representation)
    assert under_autocast.tags == reference.tags


def test_official_training_captions_come_from_ram_without_dape(tmp_path):
    from addsr_pl.models.conditioning import Conditioner

    ram = tiny_ram()
    _ram_folder(tmp_path, ram, [0.5] * 5)
    torch.save(_dape(ram), tmp_path / "DAPE.pth")
    spec = {
        "_target_": "addsr_pl.models.ram.RAMTagger.from_folder",
        "folder": str(tmp_path),
        "dape": str(tmp_path / "DAPE.pth"),
        **FOLDER_ARGS,
        **PREPROCESS,
    }
    conditioning = {"prompt": "tags", "positive_prompt": "clean", "negative_prompt": "", "tagger": spec}
    plain = Conditioner.from_config(None, None, torch.nn.Identity(), conditioning)
    assert plain.train_tagger is None
    official = Conditioner.from_config(
        None, None, torch.nn.Identity(), {**conditioning, "train_tags": "original_ram"}
    )
    original = tiny_ram().state_dict()
    for key, value in official.train_tagger.ram.state_dict().items():
        assert torch.equal(value, original[key]), key
    merged = official.tagger.ram.state_dict()
    assert any(not torch.equal(merged[k], original[k]) for k in original)
    x = images(batch=1)
    assert official.texts(x, training=True) == [official.train_tagger(x).tags[0] + ", clean"]
    with pytest.raises(ValueError, match="train_tags"):
        Conditioner.from_config(None, None, torch.nn.Identity(), {**conditioning, "train_tags": "blip"})


def photos(size: int = 96) -> torch.Tensor:
    """scikit-image's sample photos (colour and grey), resized to size x size, in [0, 1]."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
    names += ["retina", "cat", "colorwheel", "camera"]
    out = []
    for name in names:
        image = torch.from_numpy(getattr(data, name)().copy()).float() / 255
        image = image[..., None].expand(-1, -1, 3) if image.ndim == 2 else image[..., :3]
        out.append(F.interpolate(image.permute(2, 0, 1)[None], size=(size, size), mode="area"))
    return torch.cat(out)


@pytest.mark.parametrize("classes", [5, 64])
def test_ram_cast_to_bf16_keeps_float32_thresholds_and_the_photos_tags(classes):
    """A bf16 pipeline casts RAM whole: its thresholds stay float32, and a tag of a photo flips only
    where its float32 probability lies within bf16's error of its threshold (the preset's 5 tags:
    none; 64 tags on 10 photos: 1 of 640, margin 5e-4 against an error of 3e-3)."""
    torch.manual_seed(0)
    ram = RAM(**{**TINY_RAM, "num_classes": classes})
    with torch.no_grad():
        ram.label_embed.normal_()
    thresholds = 0.5 + 0.4 * torch.rand(classes, generator=torch.Generator().manual_seed(0))
    tags = [f"tag {i}" for i in range(classes)]
    fp32 = RAMTagger(copy.deepcopy(ram), tags, thresholds.tolist(), **PREPROCESS)
    bf16 = RAMTagger(copy.deepcopy(ram), tags, thresholds.tolist(), **PREPROCESS).to(torch.bfloat16)
    assert bf16.ram.fc.weight.dtype == torch.bfloat16
    assert bf16.class_thresholds.dtype == torch.float32 and torch.equal(bf16.class_thresholds, thresholds)
    x = photos()
    probabilities = [
        torch.sigmoid(t.ram.tag_logits(t.ram.image_embeds(t.preprocess(x))).float()) for t in (fp32, bf16)
    ]
    error = (probabilities[1] - probabilities[0]).abs().max()
    flips = fp32.tag_mask(x)[0] != bf16.tag_mask(x)[0]
    assert fp32.tag_mask(x)[0].sum() > x.shape[0]  # the photos have tags
    assert ((probabilities[0] - thresholds).abs()[flips] <= error).all()
    assert flips.sum() <= (0 if classes == 5 else 1)


def test_ram_runs_on_the_meta_device_for_flop_counts():
    """FLOP counts and memory plans run RAM on the meta device, where autocast does not exist."""
    tagger = RAMTagger(RAM(**TINY_RAM), [f"tag {i}" for i in range(TINY_RAM["num_classes"])],
                       [0.5] * TINY_RAM["num_classes"], **PREPROCESS).to("meta")  # fmt: skip
    mask, representation = tagger.tag_mask(torch.empty(2, 3, 32, 32, device="meta"))
    assert mask.shape == (2, TINY_RAM["num_classes"]) and mask.is_meta
    assert tagger.representation(torch.empty(2, 3, 32, 32, device="meta")).shape == representation.shape
