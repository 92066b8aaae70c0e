"""Which student weights AddSR trains (SD2's sets; `models.backbones` selects them); everything else is frozen."""

from __future__ import annotations

from torch import nn

TRAINABLE_SETS = ("official", "controlnet", "lora")


def has_image_attention(model: nn.Module) -> bool:
    return any(name.endswith("image_attentions") for name, _ in model.named_modules())


def official_modules(unet: nn.Module, controlnet: nn.Module) -> list[nn.Module]:
    """The official trainable set: every `image_attentions` module of the UNet and the ControlNet plus
    the ControlNet's `controlnet_cond_embedding`. Models without representation attention (plain SD2)
    train the ControlNet's text attention blocks in its place."""
    picked = [m for n, m in unet.named_modules() if n.endswith("image_attentions")]
    if has_image_attention(controlnet):
        picked += [m for n, m in controlnet.named_modules() if n.endswith("image_attentions")]
    else:
        picked += [m for n, m in controlnet.named_modules() if n.endswith(".attentions")]
    return [*picked, controlnet.controlnet_cond_embedding]


def merged_state_dict(model: nn.Module) -> dict:
    """The model's weights with any LoRA adapters merged in, under the plain (adapter-free) key names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            weight = base.weight.detach().clone()
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.weight"] = weight
            if getattr(base, "bias", None) is not None:
                state[f"{name}.bias"] = base.bias.detach().clone()
    for key, value in model.state_dict().items():
        if "lora_" in key or ".base_layer." in key:
            continue
        state.setdefault(key, value)
    return state
