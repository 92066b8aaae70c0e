"""Reference LR statistics of BasicSR's own Real-ESRGAN degradation, for tests/test_degradation_reference.py.

The numbers in tests/data/basicsr_degradation_reference.json come from this script. It runs BasicSR
1.4.2's code itself (``RealESRGANDataset`` for the kernels, ``RealESRGANModel.feed_data`` for the
degradation, with AddSR's ``make_paired_data.py`` parameters), one image per call as AddSR's script
does, on fixed crops of photos bundled with scikit-image, and records the medians of the statistics
in `lr_statistics`. Nothing of addsr_pl runs here, so the reference is independent of the code it tests.

How the committed numbers were made (CPU, torch 2.x, torchvision 0.2x)::

    pip download basicsr==1.4.2 --no-deps -d /tmp/bsr
    pip install --no-deps --no-build-isolation --target /tmp/bsr/site /tmp/bsr/basicsr-1.4.2.tar.gz
    PYTHONPATH=/tmp/bsr/site python bench/basicsr_degradation_reference.py --repeats 256 \\
        --out tests/data/basicsr_degradation_reference.json

BasicSR 1.4.2 imports ``torchvision.transforms.functional_tensor``, which newer torchvision has
folded into ``torchvision.transforms.functional``; the script aliases it before importing BasicSR.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# fixed HR crops: (skimage.data image, top, left); side CROP
CROP = 128
SCALE = 4
CROPS = (
    ("astronaut", 0, 0),
    ("astronaut", 40, 300),
    ("astronaut", 200, 180),
    ("astronaut", 380, 360),
    ("chelsea", 20, 40),
    ("chelsea", 100, 200),
    ("chelsea", 160, 300),
    ("coffee", 0, 0),
    ("coffee", 120, 180),
    ("coffee", 260, 400),
    ("rocket", 30, 60),
    ("rocket", 200, 250),
    ("rocket", 280, 480),
)

# AddSR's utils_data/make_paired_data.py (= BasicSR's train_realesrgan_x4plus.yml)
KERNEL_LIST = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
KERNEL_PROB = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
DATASET_OPT = {
    "blur_kernel_size": 21,
    "kernel_list": KERNEL_LIST,
    "kernel_prob": KERNEL_PROB,
    "sinc_prob": 0.1,
    "blur_sigma": [0.2, 3],
    "betag_range": [0.5, 4],
    "betap_range": [1, 2],
    "blur_kernel_size2": 21,
    "kernel_list2": KERNEL_LIST,
    "kernel_prob2": KERNEL_PROB,
    "sinc_prob2": 0.1,
    "blur_sigma2": [0.2, 1.5],
    "betag_range2": [0.5, 4],
    "betap_range2": [1, 2],
    "final_sinc_prob": 0.8,
    "use_hflip": False,
    "use_rot": False,
}
MODEL_OPT = {
    "scale": SCALE,
    "gt_size": CROP,
    "resize_prob": [0.2, 0.7, 0.1],
    "resize_range": [0.15, 1.5],
    "gaussian_noise_prob": 0.5,
    "noise_range": [1, 30],
    "poisson_scale_range": [0.05, 3],
    "gray_noise_prob": 0.4,
    "jpeg_range": [30, 95],
    "second_blur_prob": 0.8,
    "resize_prob2": [0.3, 0.4, 0.3],
    "resize_range2": [0.3, 1.2],
    "gaussian_noise_prob2": 0.5,
    "noise_range2": [1, 25],
    "poisson_scale_range2": [0.05, 2.5],
    "gray_noise_prob2": 0.4,
    "jpeg_range2": [30, 95],
}


def fixed_crops() -> torch.Tensor:
    """``[len(CROPS), 3, CROP, CROP]`` float HR crops in [0, 1]."""
    import skimage.data

    crops = []
    for name, top, left in CROPS:
        image = getattr(skimage.data, name)()[top : top + CROP, left : left + CROP, :3]
        crops.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(crops)


def lr_statistics(hr: torch.Tensor, lr: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample statistics of 8-bit LRs ``[N, 3, h, w]`` for their HRs ``[N, 3, 4h, 4w]``:

    - ``psnr_vs_bicubic``: PSNR (dB, RGB, peak 1) of the LR against the antialiased bicubic x1/4
      of the HR, rounded to 8 bits;
    - ``luma_detail`` / ``chroma_detail``: variance of the 3x3 Laplacian of Y, and the mean of those
      of Cb and Cr (JFIF YCbCr on 0..255), over the LR's interior.
    """
    hr, lr = hr.double(), lr.double()
    reference = F.interpolate(hr, size=lr.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    reference = reference.clamp(0, 1).mul(255).round() / 255
    mse = (lr - reference).pow(2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(1 / mse.clamp_min(1e-12))
    matrix = torch.tensor(
        [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
    )
    ycbcr = torch.einsum("ij,bjhw->bihw", matrix, lr * 255)
    laplacian = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64).view(1, 1, 3, 3)
    response = F.conv2d(ycbcr.reshape(-1, 1, *ycbcr.shape[-2:]), laplacian).reshape(len(lr), 3, -1)
    variance = response.var(dim=-1)
    return {
        "psnr_vs_bicubic": psnr,
        "luma_detail": variance[:, 0],
        "chroma_detail": variance[:, 1:].mean(dim=1),
    }


def medians(statistics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value.median()) for key, value in statistics.items()}


def _import_basicsr():
    import torchvision.transforms.functional as functional

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional)
    from basicsr.data.realesrgan_dataset import RealESRGANDataset
    from basicsr.models.realesrgan_model import RealESRGANModel
    from basicsr.utils import DiffJPEG, USMSharp

    return RealESRGANDataset, RealESRGANModel, DiffJPEG, USMSharp


def basicsr_lrs(hr: torch.Tensor, repeats: int, seed: int) -> torch.Tensor:
    """Every crop of `hr` degraded `repeats` times by BasicSR, one image per call; ``[N, 3, h, w]``."""
    import cv2

    RealESRGANDataset, RealESRGANModel, DiffJPEG, USMSharp = _import_basicsr()
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (BasicSR draws from NumPy's global generator)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        # the dataset is only asked for its kernels; it reads (and pads to 400) this dummy image
        cv2.imwrite(str(Path(folder) / "dummy.png"), np.zeros((8, 8, 3), np.uint8))
        (Path(folder) / "meta.txt").write_text("dummy.png\n")
        dataset = RealESRGANDataset(
            {
                **DATASET_OPT,
                "io_backend": {"type": "disk"},
                "dataroot_gt": folder,
                "meta_info": f"{folder}/meta.txt",
            }
        )
        model = RealESRGANModel.__new__(RealESRGANModel)
        model.opt, model.is_train, model.device = MODEL_OPT, True, torch.device("cpu")
        model.jpeger, model.usm_sharpener = DiffJPEG(differentiable=False), USMSharp()
        model._dequeue_and_enqueue = lambda: None  # the training pool only reorders pairs
        lrs = []
        for _ in range(repeats):
            for image in hr:
                kernels = dataset[0]
                model.feed_data(
                    {
                        "gt": image[None],
                        "kernel1": kernels["kernel1"][None],
                        "kernel2": kernels["kernel2"][None],
                        "sinc_kernel": kernels["sinc_kernel"][None],
                    }
                )
                lrs.append(model.lq)
    return torch.cat(lrs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=256, help="degradations per crop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("tests/data/basicsr_degradation_reference.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hr = fixed_crops()
    lr = basicsr_lrs(hr, args.repeats, args.seed)
    result = {
        "source": "BasicSR 1.4.2 RealESRGANModel.feed_data, AddSR make_paired_data parameters",
        "crop": CROP,
        "scale": SCALE,
        "crops": [list(c) for c in CROPS],
        "repeats": args.repeats,
        "seed": args.seed,
        "medians": medians(lr_statistics(hr.repeat(args.repeats, 1, 1, 1), lr)),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["medians"], indent=2))


if __name__ == "__main__":
    main()
