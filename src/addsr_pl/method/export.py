"""The exported student: a self-describing folder that inference loads.

Layout: `addsr_student.json` names every component, its class and where it lives; the student's
`unet/` and `controlnet/` (EMA weights, LoRA merged, fp32 safetensors) are always inside; frozen
components that came from a folder are referenced there, the others are saved beside them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

from addsr_pl.core.student_format import FORMAT, FORMAT_VERSION, MANIFEST
from addsr_pl.method.nonfinite import assert_finite_weights
from addsr_pl.models.trainable import merged_state_dict


def class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_copy(model: nn.Module) -> nn.Module:
    """An fp32 copy of the model without adapters (LoRA merged)."""
    if any("lora_" in name for name, _ in model.named_parameters()):
        fresh = type(model).from_config(model.config)
        fresh.load_state_dict({k: v.float() for k, v in merged_state_dict(model).items()})
        return fresh
    return copy.deepcopy(model).float()


def export_student(module, out_dir: str | Path, scale: int, inference: dict) -> Path:
    """Write the EMA student of an AddSRModule to `out_dir` and return the folder."""
    assert_finite_weights(module.ema.named_buffers(), "The EMA student")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components: dict[str, dict] = {}
    with module.ema.swapped_in():
        for name in ("unet", "controlnet"):
            model = _plain_copy(getattr(module.student, name))
            model.save_pretrained(out / name, safe_serialization=True)
            components[name] = {"class": class_path(model), "path": name}
    frozen = {
        "vae": module.codec.vae,
        "text_encoder": module.conditioner.prompt_encoder.text_encoder,
        "tokenizer": module.conditioner.prompt_encoder.tokenizer,
        "scheduler": module.scheduler,
    }
    for name, component in frozen.items():
        source = module.component_sources.get(name)
        if source:
            components[name] = {"class": class_path(component), "path": source, "subfolder": name}
            continue
        if isinstance(component, nn.Module):
            component = copy.deepcopy(component).float()
        component.save_pretrained(out / name)
        components[name] = {"class": class_path(component), "path": name}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "components": components,
        # inference needs no training-caption tagger
        "conditioning": {**module.hparams["conditioning"], "train_tags": "tagger"},
        "sampler": {
            "student_timesteps": list(module.method["student_timesteps"]),
            "conditioning_scale": module.method["conditioning_scale"],
            **inference,
        },
        "scale": scale,
        # the speed defaults of `addsr-pl upscale` and evaluation (their null speed keys)
        "speed": module.method.get("inference_speed"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
