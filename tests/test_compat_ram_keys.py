"""Full-size RAM Swin-L 14M and DAPE (meta device) against the key lists written from the official classes.

tests/data/compat/ram_swin_large_14m_keys.txt: the state dict of recognize-anything's RAM (what
ram_swin_large_14m.pth holds); dape_keys.txt: the LoRA keys of SeeSR's RAMLora (what DAPE.pth holds).
See docs/compatibility.md for how they were generated.
"""

from pathlib import Path

import torch

from addsr_pl.models.ram import RAM, RECOMPUTED_BUFFERS, UNUSED_CHECKPOINT_PARTS, merge_dape

COMPAT = Path(__file__).parent / "data" / "compat"

# configs/swin/config_swinL_384.json and configs/q2l_config.json of recognize-anything
RAM_SWIN_L_14M = dict(
    image_size=384,
    patch_size=4,
    embed_dim=192,
    depths=[2, 2, 18, 2],
    num_heads=[6, 12, 24, 48],
    window_size=12,
    mlp_ratio=4.0,
    swin_norm_eps=1e-5,
    representation_dim=512,
    num_classes=4585,
    head_layers=2,
    head_hidden_size=768,
    head_heads=4,
    head_intermediate_size=3072,
    head_norm_eps=1e-12,
)


def reference(name):
    entries = [line.split(" ") for line in (COMPAT / name).read_text().splitlines()]
    return {key: tuple(int(n) for n in shape.split("x")) for key, shape in entries}


def full_size_ram():
    with torch.device("meta"):
        return RAM(**RAM_SWIN_L_14M)


def test_compat_ram_swin_l_keys_are_the_checkpoint_keys_used_for_tagging():
    official = reference("ram_swin_large_14m_keys.txt")
    used = {
        k: v
        for k, v in official.items()
        if not k.startswith(UNUSED_CHECKPOINT_PARTS) and not k.endswith(RECOMPUTED_BUFFERS)
    }
    ours = {k: tuple(v.shape) for k, v in full_size_ram().state_dict().items()}
    assert ours == used
    assert len(ours) == 366 and len(official) == 1042


def test_compat_dape_file_merges_into_full_size_ram():
    lora = {k: torch.empty(shape, device="meta") for k, shape in reference("dape_keys.txt").items()}
    assert len(lora) == 248
    counts = merge_dape(full_size_ram(), lora, lora_alpha=1.0)
    # 24 Swin qkv + 2 layers x (query, key) in the tagging head + the same in the tied tag_encoder layers
    assert counts == {"merged": 24 + 4 + 4, "skipped (not used for tagging)": 124 - 32}


def test_compat_ram_swin_l_gives_seesrs_145_token_representation():
    ram = full_size_ram()
    embeds, logits = ram(torch.empty(2, 3, 384, 384, device="meta"))  # shapes only, no compute
    assert embeds.shape == (2, 145, 512)  # mean token + 12 x 12 grid
    assert logits.shape == (2, 4585)
