"""The exported student's folder format, read and written by both sides.

`addsr_student.json` is data, never code: each component names its class by a name from
`COMPONENT_CLASSES` (nothing is imported from a name the file gives) and where its files are, either
`"path"` (a folder inside the student folder) or `"weights"` (a folder under the weights folder,
`paths.weights_dir` / `ADDSR_PL_WEIGHTS`, e.g. SD2's `stable-diffusion-2-base`), plus an optional
`"subfolder"`. File arguments of the tagger are written the same way: a path string inside the
student folder, or `{"weights": "<path under the weights folder>"}`. No absolute path of the
training machine is written, so the folder can be copied to another machine.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "addsr_student.json"
FORMAT = "addsr-pl-student"
# 1: class paths, absolute folders of frozen components, the tagger's Hydra `_target_`;
# 2: class names, weights-relative references, the tagger's `kind`. Both are read.
FORMAT_VERSION = 2

# component -> the classes it may be, by name (`inference.student.CLASSES` maps each name to its class)
COMPONENT_CLASSES = {
    "unet": ("UNet2DConditionModel", "SeeSRUNet2DConditionModel"),
    "transformer": ("SD3Transformer2DModel", "FluxTransformer2DModel"),
    "controlnet": ("ControlNetModel", "SeeSRControlNetModel", "SD3ControlNetModel", "FluxControlNetModel"),
    "vae": ("AutoencoderKL", "PixelUnshuffleCodec"),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("CLIPTextModelWithProjection", "T5EncoderModel"),
    "text_encoder_3": ("T5EncoderModel",),
    "tokenizer": ("CLIPTokenizer",),
    "tokenizer_2": ("CLIPTokenizer", "T5TokenizerFast"),
    "tokenizer_3": ("CLIPTokenizer", "T5TokenizerFast"),
    "scheduler": ("DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler"),
    "reference_scheduler": ("DDPMScheduler",),
    "psr_decoder": ("AutoencoderTiny",),
}
# The components a student of each backbone (`models.backbones`) names; a manifest without `backbone`
# is SD2's (every student written before there were others).
BACKBONE_COMPONENTS = {
    "sd2": ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sd3": ("transformer", "controlnet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
            "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "reference_scheduler"),
    "sdxl": ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
             "scheduler"),
    "flux": ("transformer", "controlnet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
             "scheduler", "reference_scheduler"),
}  # fmt: skip
DEFAULT_BACKBONE = "sd2"
REQUIRED_COMPONENTS = BACKBONE_COMPONENTS[DEFAULT_BACKBONE]


class StudentFolderError(ValueError):
    """A student folder that cannot be used: one line naming the file, the problem and the fix."""


def class_name(obj) -> str:
    """The manifest name of a component's class (a key of `COMPONENT_CLASSES`)."""
    return type(obj).__name__


def weights_reference(path: str | Path, weights_dir: str | Path | None) -> str | None:
    """`path` relative to the weights folder (posix), or None when it lies outside it."""
    if not weights_dir:
        return None
    path, root = Path(path).expanduser().resolve(), Path(weights_dir).expanduser().resolve()
    if path == root or not path.is_relative_to(root):
        return None
    return path.relative_to(root).as_posix()
