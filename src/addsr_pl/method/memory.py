"""Memory and speed levers of the training iteration; none of them changes the maths.

Each is a key of `method.memory` (conf/method/addsr.yaml states its cost); tests/test_memory_levers.py
checks every one against the plain computation.
"""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import Tensor, nn

# Blocks that repeat through the UNet (SD3, FLUX: the transformer) and the ControlNet: compiled one by one
# (regional compilation), so each distinct shape is compiled once and reused by its repeats.
REPEATED_BLOCKS = (
    BasicTransformerBlock,
    JointTransformerBlock,
    FluxTransformerBlock,
    FluxSingleTransformerBlock,
    ResnetBlock2D,
)


MEMORY_SWITCHES = (
    "share_frozen_weights",
    "gradient_checkpointing",
    "vae_gradient_checkpointing",
    "vae_outside_autocast",
    "fused_adamw",
    "discriminator_batched",
)


def check_memory_config(memory: dict) -> None:
    """Name a bad `method.memory` value at start-up (EMA placement and dtype are checked by EMA); the
    levers the plan may choose are checked once resolved (method/lever_plan.py)."""
    for key in MEMORY_SWITCHES:
        if not isinstance(memory[key], bool):
            raise ValueError(f"method.memory.{key} = {memory[key]!r}: must be true or false")
    chunk = memory["teacher_decode_chunk"]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(
            f"method.memory.teacher_decode_chunk = {chunk!r}: must be null (all at once), >= 1 or auto"
        )


def copy_sharing_frozen(model: nn.Module, trained_ids: set[int]) -> nn.Module:
    """A deep copy of `model` whose parameters outside `trained_ids` are the original Parameter objects.

    Student and teacher start from the same checkpoint and the student trains only a subset, so the
    frozen rest need not exist twice: both models read one storage (saving one copy of the frozen
    UNet + ControlNet). Casting or moving either model moves the shared weights for both.
    """
    memo = {id(p): p for p in model.parameters() if id(p) not in trained_ids}
    return copy.deepcopy(model, memo)


def shared_parameters(a: nn.Module, b: nn.Module) -> list[str]:
    """Names (in `a`) of the parameters that `a` and `b` hold as the same object."""
    in_b = {id(p) for p in b.parameters()}
    return [name for name, p in a.named_parameters() if id(p) in in_b]


def switch_gradient_checkpointing(student_networks, codec, levers: dict) -> None:
    """diffusers' own activation checkpointing (ResNet and transformer blocks are recomputed in backward),
    on or off by the levers: the student's networks by `gradient_checkpointing`, the VAE by
    `vae_gradient_checkpointing` (a lossless codec has no activations to recompute)."""
    switched = [(network, levers["gradient_checkpointing"]) for network in student_networks]
    if not codec.lossless:
        switched.append((codec.vae, levers["vae_gradient_checkpointing"]))
    for network, on in switched:
        if on:
            network.enable_gradient_checkpointing()
        else:
            network.disable_gradient_checkpointing()


def decode_in_chunks(codec, latents: Tensor, chunk: int | None) -> Tensor:
    """codec.decode over slices of at most `chunk` latents (None: all at once); the same images."""
    if not chunk or latents.shape[0] <= chunk:
        return codec.decode(latents)
    return torch.cat([codec.decode(part) for part in latents.split(chunk)])


def compile_repeated_blocks(model: nn.Module, **options) -> int:
    """torch.compile each repeated block of `model` in place; returns how many were compiled."""
    blocks = [m for m in model.modules() if isinstance(m, REPEATED_BLOCKS)]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def optimizer_options(target: str, fused_adamw: bool, device: torch.device) -> dict:
    """Extra constructor arguments: `fused=True` for torch's AdamW on CUDA when `fused_adamw` is set."""
    if fused_adamw and device.type == "cuda" and target == "torch.optim.AdamW":
        return {"fused": True}
    return {}
