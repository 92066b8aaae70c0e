"""The exported student: a self-describing folder that inference loads.

Layout: `addsr_student.json` names the backbone, every component, its class and where it lives; the
student's networks (SD2: `unet/` and `controlnet/`; EMA weights, LoRA merged, fp32 safetensors) are always inside; frozen
components that came from the weights folder (`paths.weights_dir`) are referenced relative to it, the
others are saved beside them. The tagger's files are referenced the same way (or copied in), so the
manifest holds no absolute path and the folder works on another machine (`core.student_format`).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

from torch import nn

from addsr_pl.core.student_format import FORMAT, FORMAT_VERSION, MANIFEST, class_name, weights_reference
from addsr_pl.method.nonfinite import assert_finite_weights
from addsr_pl.models.conditioning import tagger_files, tagger_kind
from addsr_pl.models.trainable import merged_state_dict

log = logging.getLogger(__name__)
# Where tagger files from outside the weights folder are copied inside the student folder.
TAGGER_FOLDER = "tagger"
RANDOM_TAGGER_FILE = "ram_random.safetensors"


def _plain_copy(model: nn.Module) -> nn.Module:
    """An fp32 copy of the model without adapters (LoRA merged)."""
    if any("lora_" in name for name, _ in model.named_parameters()):
        fresh = type(model).from_config(model.config)
        fresh.load_state_dict({k: v.float() for k, v in merged_state_dict(model).items()})
        return fresh
    return copy.deepcopy(model).float()


def manifest_tagger(spec: dict | None, out: Path, weights_dir: str | Path | None) -> dict | None:
    """The tagger as the manifest holds it: its `kind` and arguments, each file or folder a reference
    under the weights folder, or (outside it) copied into `<student>/tagger/` and named relative to the
    student folder."""
    if not spec:
        return None
    kind = tagger_kind(spec)
    tagger = {"kind": kind, **{k: v for k, v in spec.items() if k not in ("kind", "_target_")}}
    for name, value in tagger_files(kind, tagger):
        reference = weights_reference(value, weights_dir)
        if reference is not None:
            tagger[name] = {"weights": reference}
            continue
        source = Path(value).expanduser()
        target = out / TAGGER_FOLDER / source.name
        log.info(
            "The tagger's %s is outside paths.weights_dir (%s): copied into %s", name, weights_dir, target
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        tagger[name] = target.relative_to(out).as_posix()
    return tagger


def save_random_tagger(tagger: nn.Module, out: Path) -> str:
    """A randomly initialised tiny RAM has no file to point at: its weights are saved into the student
    (`tagger/ram_random.safetensors`), so that inference sees the tags and representation training saw."""
    from safetensors.torch import save_file

    target = out / TAGGER_FOLDER / RANDOM_TAGGER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.float() if v.is_floating_point() else v).detach().clone()
        for k, v in tagger.ram.state_dict().items()
    }
    save_file(state, target)
    return target.relative_to(out).as_posix()


def export_student(
    module, out_dir: str | Path, scale: int, inference: dict, weights_dir: str | Path | None = None
) -> Path:
    """Write the EMA student of an AddSRModule to `out_dir` and return the folder; frozen parts and
    tagger files under `weights_dir` are referenced relative to it."""
    assert_finite_weights(module.ema.named_buffers(), "The EMA student")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    components: dict[str, dict] = {}
    with module.ema.swapped_in():
        for name, network in module.student.networks().items():
            model = _plain_copy(network)
            model.save_pretrained(out / name, safe_serialization=True)
            components[name] = {"class": class_name(model), "path": name}
    for name, component in module.frozen_parts.items():
        source = module.component_sources.get(name)
        reference = weights_reference(source, weights_dir) if source else None
        if reference is not None:
            components[name] = {"class": class_name(component), "weights": reference, "subfolder": name}
            continue
        if source:
            log.info(
                "The %s of %s is outside paths.weights_dir (%s): saved into the student",
                name,
                source,
                weights_dir,
            )
        if isinstance(component, nn.Module):
            component = copy.deepcopy(component).float()
            component.save_pretrained(out / name, safe_serialization=True)
        else:
            component.save_pretrained(out / name)
        components[name] = {"class": class_name(component), "path": name}
    conditioning = {**module.hparams["conditioning"], "train_tags": "tagger"}  # inference tags with `tagger`
    conditioning["tagger"] = manifest_tagger(conditioning.get("tagger"), out, weights_dir)
    if conditioning["tagger"] is not None and conditioning["tagger"]["kind"] == "ram_random":
        conditioning["tagger"]["weights"] = save_random_tagger(module.conditioner.tagger, out)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": module.backbone.name,
        "components": components,
        "conditioning": conditioning,
        "sampler": {
            "student_timesteps": module.student_timesteps.tolist(),  # the schedule's own
            "conditioning_scale": module.method["conditioning_scale"],
            **inference,
        },
        "scale": scale,
        # the speed defaults of `addsr-pl upscale` and evaluation (their null speed keys)
        "speed": module.method.get("inference_speed"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
