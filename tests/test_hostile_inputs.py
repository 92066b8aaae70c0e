"""Student folders and images from anyone: nothing in them runs, and each problem is one line, exit 2.

Crafted manifests (a Hydra `_target_` chain through `torch.load`, a class outside the allowlist), pickle
payloads where weights are expected (a component's `.bin`, the tagger's RAM checkpoint), damaged
folders, a decompression bomb among good images; and a trained student that is copied to another
place, with its weights folder moved, and still upscales.
"""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from addsr_pl.core.student_format import MANIFEST
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.upscale import main

PAYLOAD_MODULE = "addsr_payload_module"


class Payload:
    """A pickle that, when unpickled without `weights_only`, creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def pickled_payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def student(tiny_student, tmp_path):
    """A copy of the tiny student to damage: (folder, its manifest as a dict, a writer for the manifest)."""
    folder = tmp_path / "student"
    shutil.copytree(tiny_student, folder)
    manifest = json.loads((folder / MANIFEST).read_text())

    def write(value) -> None:
        (folder / MANIFEST).write_text(value if isinstance(value, str) else json.dumps(value))

    return folder, manifest, write


def upscale_fails(capsys, photo, folder, *fragments) -> str:
    """`addsr-pl upscale` on `folder`: exit 2, one line on stderr holding every fragment, no traceback,
    nothing written."""
    out = photo.parent.parent / "out"
    code = main([str(photo), "-o", str(out), "--model", str(folder), "--no-progress", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    return err


# ------------------------------------------------------------------------------------ code that must not run


def test_a_target_chain_in_the_manifest_runs_nothing(student, photo, tmp_path, capsys):
    folder, manifest, write = student
    marker = tmp_path / "ran"
    data = base64.b64encode(pickled_payload(marker)).decode()
    manifest["conditioning"]["tagger"] = {
        "_target_": "torch.load",
        "f": {"_target_": "io.BytesIO", "initial_bytes": {"_target_": "base64.b64decode", "s": data}},
        "weights_only": False,
    }
    write(manifest)
    upscale_fails(capsys, photo, folder, str(folder / MANIFEST), "_target_", "torch.load")
    assert not marker.exists()


def test_a_tagger_target_outside_the_allowlist_runs_nothing(student, photo, tmp_path, capsys):
    folder, manifest, write = student
    marker = tmp_path / "ran"
    # a target Hydra's own blocklist lets through (it stops exec, os.system, subprocess)
    manifest["conditioning"]["tagger"] = {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}
    write(manifest)
    upscale_fails(capsys, photo, folder, str(folder / MANIFEST), "pathlib.Path.touch")
    assert not marker.exists()


def test_a_component_class_outside_the_allowlist_is_never_imported(
    student, photo, tmp_path, capsys, monkeypatch
):
    folder, manifest, write = student
    marker = tmp_path / "ran"
    # a module that runs its payload on import, where the import system finds it (as `python -m` puts the
    # working folder on sys.path)
    (tmp_path / f"{PAYLOAD_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PAYLOAD_MODULE, raising=False)
    manifest["components"]["unet"]["class"] = f"{PAYLOAD_MODULE}.Model"
    write(manifest)
    upscale_fails(
        capsys, photo, folder, str(folder / MANIFEST), "components.unet.class", "UNet2DConditionModel"
    )
    assert not marker.exists()


def test_a_pickle_in_place_of_a_components_safetensors_is_never_unpickled(student, photo, tmp_path, capsys):
    folder, _, _ = student
    marker = tmp_path / "ran"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    payload = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": Payload(marker)}, payload)
    upscale_fails(capsys, photo, folder, str(payload), "pickle")
    assert not marker.exists()


def test_a_pickle_payload_as_the_taggers_checkpoint_is_refused(student, photo, tmp_path, capsys):
    from test_ram import FOLDER_ARGS, PREPROCESS, TAGS

    folder, manifest, write = student
    marker = tmp_path / "ran"
    ram = folder / "tagger" / "ram"
    ram.mkdir(parents=True)
    torch.save({"model": Payload(marker)}, ram / FOLDER_ARGS["checkpoint"])
    (ram / FOLDER_ARGS["tag_list"]).write_text("\n".join(TAGS))
    (ram / FOLDER_ARGS["tag_thresholds"]).write_text("\n".join(["0.5"] * len(TAGS)))
    manifest["conditioning"]["tagger"] = {
        "kind": "ram", "folder": "tagger/ram", "dape": None, **FOLDER_ARGS, **PREPROCESS,
        "image_mean": list(PREPROCESS["image_mean"]), "image_std": list(PREPROCESS["image_std"]),
    }  # fmt: skip
    write(manifest)
    upscale_fails(capsys, photo, folder, str(ram / FOLDER_ARGS["checkpoint"]), "weights_only")
    assert not marker.exists()


def test_evaluate_refuses_a_hostile_student_in_one_line(student, tmp_path, capsys, monkeypatch):
    from addsr_pl import evaluate

    folder, manifest, write = student
    marker = tmp_path / "ran"
    manifest["conditioning"]["tagger"] = {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}
    write(manifest)
    out = tmp_path / "eval"
    monkeypatch.setattr(
        sys, "argv", ["evaluate", f"student={folder}", f"hydra.run.dir={out}", "metrics.names=[psnr]"]
    )
    with pytest.raises(SystemExit) as exit_:
        evaluate.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1 and str(folder / MANIFEST) in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------------------ damaged folders


def _set(manifest: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = manifest
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return manifest


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (("sampler.student_timesteps", [249, 499]), ["strictly decreasing"]),
        (("sampler.student_timesteps", []), ["strictly decreasing"]),
        (("sampler.student_timesteps", [1500, 499]), ["student_timesteps"]),
        (("sampler.student_timesteps", "999,499"), ["student_timesteps", "must be a list"]),
        (("sampler.psr_weight", "high"), ["psr_weight"]),
        (("scale", 0), ["scale"]),
        (("scale", KeyError), ["missing scale"]),
        (("sampler", KeyError), ["missing sampler"]),
        (("components.vae", KeyError), ["components lacks vae"]),
        (("components.unet.path", "/nowhere/at/all"), ["/nowhere/at/all", "does not exist"]),
        (("components.unet.path", "../../elsewhere"), ["cannot leave it"]),
        (("components.vae.class", "UNet2DConditionModel"), ["components.vae.class", "AutoencoderKL"]),
        (("format", "something-else"), ["not an addsr-pl student folder"]),
        (("version", 99), ["newer"]),
        (("conditioning.prompt", 3), ["conditioning.prompt"]),
    ],
)
def test_a_damaged_manifest_is_one_line_naming_it(student, photo, capsys, change, fragments):
    folder, manifest, write = student
    write(_set(manifest, *change))
    upscale_fails(capsys, photo, folder, str(folder / MANIFEST), *fragments)


@pytest.mark.parametrize(
    ("text", "fragment"), [("{not json", "not JSON"), ("[1, 2]", "found a list"), ("\xff\xfe", "not JSON")]
)
def test_a_manifest_that_is_not_a_json_object(student, photo, capsys, text, fragment):
    folder, _, write = student
    write(text)
    upscale_fails(capsys, photo, folder, str(folder / MANIFEST), fragment)


def test_a_missing_manifest(student, photo, capsys, tmp_path):
    from addsr_pl.inference.pipeline import AddSRPipeline
    from addsr_pl.inference.student import StudentFolderError

    folder, _, _ = student
    (folder / MANIFEST).unlink()
    upscale_fails(capsys, photo, folder, str(folder), MANIFEST)
    with pytest.raises(StudentFolderError, match=str(folder / MANIFEST)):
        AddSRPipeline.from_folder(folder)  # the library call says the same, in one line


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty", "garbage_header"])
def test_missing_or_damaged_safetensors(student, photo, capsys, damage):
    """Each damage is found from the file itself, before any component's weights are read, and named."""
    folder, _, _ = student
    weights = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    if damage == "missing":
        weights.unlink()
        upscale_fails(capsys, photo, folder, str(folder / "controlnet"), "no safetensors weights")
        return
    damaged, problem = {
        "truncated": (data[: len(data) // 2], "truncated safetensors file"),
        "empty": (b"", "truncated safetensors file (0 bytes)"),
        "garbage_header": (b"\x10" * 64, "not a safetensors file"),
    }[damage]
    weights.write_bytes(damaged)
    upscale_fails(capsys, photo, folder, str(weights), problem)


# ------------------------------------------------------------------------------------ images


def one_colour_png(path: Path, width: int, height: int) -> Path:
    """An 8-bit gray PNG of one colour, compressed row by row (never held whole in memory): a small file
    that decodes to width x height bytes, or 12 x that as float RGB."""
    from addsr_pl.inference.io import _PNG_SIGNATURE, _png_chunk

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter type 0 and the pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_is_skipped_undecoded_and_the_others_are_written(tiny_student, tmp_path, capsys):
    from addsr_pl.inference import io

    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
            root / name
        )
    # 100 MP: above limits.max_input_pixels and Pillow's warning limit, below its error limit (which
    # alone would let it be decoded: 1.2 GB as float RGB)
    bomb = one_colour_png(root / "b.png", 10000, 10000)
    assert bomb.stat().st_size < 1_000_000
    decoded = []
    original = io._decode

    def spy(path, *args):  # records what reached the decoder; the bomb is stopped here if it ever does
        decoded.append(path)
        if path == bomb:
            raise io.ImageReadError(path, "reached the decoder")
        return original(path, *args)

    io._decode = spy
    try:
        code = main(
            [str(root), "-o", str(tmp_path / "out"), "--model", tiny_student, "--steps", "1", "--no-progress"]
        )
    finally:
        io._decode = original
    err = capsys.readouterr().err
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    lines = [line for line in err.splitlines() if "b.png" in line]
    assert len(lines) == 1 and "max_input_pixels" in lines[0] and "10000x10000" in lines[0], err
    assert bomb not in decoded and len(decoded) == 2


def test_16_bit_png_and_tiff_are_refused_by_their_size_too(tmp_path):
    from addsr_pl.inference.io import ImageReadError, encode_png16, read_image

    pixels = np.zeros((40, 50, 3), dtype=np.uint16)
    png = tmp_path / "deep.png"
    png.write_bytes(encode_png16(pixels))
    tiff = tmp_path / "deep.tif"
    import tifffile

    tifffile.imwrite(tiff, pixels, photometric="rgb")
    for path in (png, tiff):
        assert read_image(path, max_pixels=2000).bit_depth == 16
        with pytest.raises(ImageReadError, match="50x40 pixels"):
            read_image(path, max_pixels=1999)


# ------------------------------------------------------------------------------------ portable folders


def test_a_copied_student_upscales_with_its_weights_folder_moved(tmp_path, cache_dir, capsys, monkeypatch):
    """A tiny SeeSR student whose VAE and RAM/DAPE tagger live in the weights folder: the manifest holds
    no absolute path, and a copy of the folder upscales once ADDSR_PL_WEIGHTS names the moved weights."""
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf
    from test_ram import FOLDER_ARGS, TAGS, _dape, _ram_folder, tiny_ram

    from addsr_pl.train import train

    from conftest import compose_train

    weights = tmp_path / "weights"
    (weights / "ram").mkdir(parents=True)
    ram = tiny_ram()
    _ram_folder(weights / "ram", ram, [0.5] * len(TAGS))
    torch.save(_dape(ram), weights / "DAPE.pth")
    tagger = [
        "conditioning.tagger._target_=addsr_pl.models.ram.RAMTagger.from_folder",
        "~conditioning.tagger.class_thresholds",
    ]
    tagger += [
        f"conditioning.tagger.tag_list={FOLDER_ARGS['tag_list']}",
        f"+conditioning.tagger.folder={weights / 'ram'}",
    ]
    tagger += [
        f"+conditioning.tagger.{k}={FOLDER_ARGS[k]}" for k in ("checkpoint", "tag_thresholds", "lora_alpha")
    ]
    tagger += [f"+conditioning.tagger.dape={weights / 'DAPE.pth'}"]
    overrides = ["model=tiny_seesr", "conditioning=tiny_ram", *tagger, f"paths.weights_dir={weights}",
                 "data.crop_size=32", "trainer.max_steps=1", "trainer.limit_val_batches=0"]  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    vae_config = OmegaConf.to_container(compose_train(run, overrides, cache_dir).model.components.vae)
    AutoencoderKL(**vae_config).save_pretrained(weights / "tiny_sd" / "vae")
    student = Path(
        train(
            compose_train(run, [*overrides, f"model.components.vae_path={weights / 'tiny_sd'}"], cache_dir)
        )["student"]
    )

    text = (student / MANIFEST).read_text()
    assert str(tmp_path) not in text
    manifest = json.loads(text)
    assert manifest["components"]["vae"] == {
        "class": "AutoencoderKL",
        "weights": "tiny_sd",
        "subfolder": "vae",
    }
    assert manifest["conditioning"]["tagger"]["folder"] == {"weights": "ram"}
    assert manifest["conditioning"]["tagger"]["dape"] == {"weights": "DAPE.pth"}

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(student, elsewhere / "student")
    shutil.rmtree(run)
    moved = elsewhere / "my_weights"
    weights.rename(moved)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(photo)
    argv = [str(photo), "-o", str(tmp_path / "x4.png"), "--model", str(elsewhere / "student"), "--steps", "1"]
    monkeypatch.delenv("ADDSR_PL_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # the training run's output
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny_sd" in err and "ADDSR_PL_WEIGHTS" in err, err
    monkeypatch.setenv("ADDSR_PL_WEIGHTS", str(moved))
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "x4.png").size == (64, 48)


def test_a_version_1_manifest_still_loads(student):
    """Older students: import-path class names, an absolute folder that exists, the tagger's `_target_`
    (one of the allowed factories, called directly)."""
    from omegaconf import OmegaConf

    from addsr_pl.inference.pipeline import AddSRPipeline
    from addsr_pl.models.ram import RAMTagger
    from addsr_pl.paths import config_dir

    folder, manifest, write = student
    manifest["version"] = 1
    manifest["components"]["unet"]["class"] = "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel"
    manifest["components"]["text_encoder"]["class"] = "transformers.models.clip.modeling_clip.CLIPTextModel"
    manifest["components"]["vae"] = {
        "class": "diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL",
        "path": str(folder.resolve()),
        "subfolder": "vae",
    }
    tagger = OmegaConf.to_container(OmegaConf.load(config_dir() / "conditioning" / "tiny_ram.yaml").tagger)
    assert tagger["_target_"] == "addsr_pl.models.ram.RAMTagger.random"
    manifest["conditioning"]["tagger"] = tagger
    write(manifest)
    pipeline = AddSRPipeline.from_folder(folder)
    assert isinstance(pipeline.conditioner.tagger, RAMTagger)
    assert pipeline.student_timesteps == manifest["sampler"]["student_timesteps"]


def test_a_random_tiny_ram_is_exported_with_its_weights_and_loads_as_trained(make_cfg, tmp_path):
    """A tiny RAM has no checkpoint file: its random draws travel inside the student, so every load sees
    the tagger the student was trained with (not a fresh draw per load)."""
    from addsr_pl.method.export import export_student
    from addsr_pl.method.module import AddSRModule

    from conftest import to_dicts

    module = AddSRModule(**to_dicts(make_cfg(["model=tiny_seesr", "conditioning=tiny_ram"])))
    folder = export_student(module, tmp_path / "student", 4, {"psr": True, "psr_weight": 0.5})
    trained = module.conditioner.tagger.ram.state_dict()
    for _ in range(2):
        loaded = AddSRPipeline.from_folder(folder).conditioner.tagger.ram.state_dict()
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained)
