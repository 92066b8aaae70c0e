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
    "controlnet": ("ControlNetModel", "SeeSRControlNetModel"),
    "vae": ("AutoencoderKL", "PixelUnshuffleCodec"),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer",),
    "scheduler": ("DDPMScheduler", "DDIMScheduler"),
    "psr_decoder": ("AutoencoderTiny",),
}
REQUIRED_COMPONENTS = ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler")


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
