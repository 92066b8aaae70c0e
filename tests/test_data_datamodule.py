"""AddSRDataModule: batch contract, determinism, rank separation, mid-epoch resume."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from addsr_pl.data.datamodule import AddSRDataModule
from addsr_pl.data.datasets import SampleDataset
from addsr_pl.data.degradation import BicubicDegradation
from addsr_pl.paths import config_dir


def compose_data(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("data/sample", overrides=["+seed=7", *overrides]).data


@pytest.fixture(scope="module")
def sample_train() -> SampleDataset:
    return SampleDataset(["astronaut", "coffee", "chelsea"], crop_size=32, repeats=4)


def make_dm(train, **kwargs) -> AddSRDataModule:
    args = dict(scale=4, crop_size=32, batch_size=2, seed=11)
    args.update(kwargs)
    return AddSRDataModule(train=train, val=None, degradation=BicubicDegradation(4), **args)


def batches(dm: AddSRDataModule, count: int) -> list[dict]:
    loader = dm.train_dataloader()
    out = []
    for batch in loader:
        out.append(dm.degrade(batch))
        if len(out) == count:
            break
    return out


def test_sample_config_batches_have_the_contract_shapes_and_range():
    cfg = compose_data()
    dm = hydra.utils.instantiate(cfg)
    assert isinstance(dm, AddSRDataModule)
    batch = dm.degrade(next(iter(dm.train_dataloader())))
    size = cfg.crop_size
    assert batch["hr"].shape == (cfg.batch_size, 3, size, size)
    assert batch["lr"].shape == (cfg.batch_size, 3, size // 4, size // 4)
    for key in ("hr", "lr"):
        assert batch[key].dtype == torch.float32
        assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
    # LR is stored at 8-bit levels
    torch.testing.assert_close(batch["lr"] * 255, (batch["lr"] * 255).round(), atol=1e-4, rtol=0)

    val = next(iter(dm.val_dataloader()))
    assert val["name"] == list(cfg.val.names)[: cfg.val_batch_size]
    assert val["hr"].shape == (cfg.val_batch_size, 3, size, size)
    assert val["lr"].shape == (cfg.val_batch_size, 3, size // 4, size // 4)


def test_same_seed_gives_bit_identical_batches(sample_train):
    first, second = batches(make_dm(sample_train), 3), batches(make_dm(sample_train), 3)
    for a, b in zip(first, second):
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"])
    other = batches(make_dm(sample_train, seed=12), 3)
    assert not all(torch.equal(a["hr"], b["hr"]) for a, b in zip(first, other))


def test_workers_give_the_same_batches_as_the_main_process(sample_train):
    inline = batches(make_dm(sample_train), 3)
    workers = batches(make_dm(sample_train, num_workers=2), 3)
    for a, b in zip(inline, workers):
        assert torch.equal(a["hr"], b["hr"])


def test_ranks_see_disjoint_items_and_different_batches(sample_train):
    rank0 = batches(make_dm(sample_train, rank=0, world_size=2), 3)
    rank1 = batches(make_dm(sample_train, rank=1, world_size=2), 3)
    for a, b in zip(rank0, rank1):
        assert not torch.equal(a["hr"], b["hr"])
    # the two shards of one epoch cover the dataset exactly once
    s0 = make_dm(sample_train, rank=0, world_size=2).train_dataloader().sampler
    s1 = make_dm(sample_train, rank=1, world_size=2).train_dataloader().sampler
    indices = [i for i, _ in s0] + [i for i, _ in s1]
    assert sorted(indices) == list(range(len(sample_train)))


def test_degradation_generator_differs_per_rank():
    class Noise(torch.nn.Module):
        scale = 4

        def forward(self, hr, generator):
            return hr, torch.rand(hr.shape[0], 3, 1, 1, generator=generator, device=hr.device)

    train = SampleDataset(["astronaut"], crop_size=32, repeats=4)
    batch = {"hr": torch.zeros(2, 3, 32, 32)}
    lrs = [
        AddSRDataModule(train, None, Noise(), crop_size=32, batch_size=2, seed=1, rank=r).degrade(batch)["lr"]
        for r in (0, 1)
    ]
    assert not torch.equal(lrs[0], lrs[1])


def test_epochs_reshuffle(sample_train):
    loader = make_dm(sample_train).train_dataloader()
    epoch0 = [i for i, _ in loader.sampler]
    loader.sampler.set_epoch(1)
    epoch1 = [i for i, _ in loader.sampler]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_state_dict_round_trip_resumes_at_the_next_batch(sample_train):
    reference = batches(make_dm(sample_train), 5)

    dm = make_dm(sample_train)
    loader = dm.train_dataloader()
    for step, batch in enumerate(loader):
        dm.degrade(batch)
        if step == 2:
            break
    loader_state, dm_state = loader.state_dict(), dm.state_dict()
    assert loader_state == {"epoch": 0, "batches": 3} and dm_state == {"batch_counter": 3}

    resumed = make_dm(sample_train)
    resumed.load_state_dict(dm_state)
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(loader_state)
    rest = [resumed.degrade(b) for b in resumed_loader]
    assert len(rest) == len(resumed_loader) - 3
    for a, b in zip(reference[3:], rest):
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"])


class _Recorder(pl.LightningModule):
    """Records the LR of every training batch it sees; one parameter so the optimizer has work."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["lr"].clone())
        return (self.weight - batch["lr"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(train, root, max_steps: int, ckpt_path=None, every_n_train_steps=None):
    model = _Recorder()
    callbacks = []
    if every_n_train_steps:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=root, every_n_train_steps=every_n_train_steps, save_top_k=-1, filename="{step}"
            )
        )
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=make_dm(train), ckpt_path=ckpt_path)
    return model


def test_lightning_resume_mid_epoch_reproduces_the_uninterrupted_batches(sample_train, tmp_path):
    # 6 batches per epoch: the checkpoint at step 4 is mid-epoch and the run crosses into epoch 1
    full = _fit(sample_train, tmp_path, max_steps=9, every_n_train_steps=4)
    resumed = _fit(sample_train, tmp_path / "resumed", max_steps=9, ckpt_path=tmp_path / "step=4.ckpt")
    assert len(resumed.seen) == 5
    for a, b in zip(full.seen[4:], resumed.seen):
        assert torch.equal(a, b)


def test_folder_config_needs_a_root_and_names_an_empty_one(tmp_path):
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match="root"):
        hydra.utils.instantiate(compose_data_named("folder"))
    # Hydra wraps the dataset's FileNotFoundError; the message keeps the path
    with pytest.raises(InstantiationException, match=f"No images found in {tmp_path}"):
        hydra.utils.instantiate(compose_data_named("folder", f"data.train.root={tmp_path}"))
    with pytest.raises(InstantiationException, match="missing_dir does not exist"):
        hydra.utils.instantiate(compose_data_named("folder", f"data.train.root={tmp_path / 'missing_dir'}"))


def compose_data_named(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(f"data/{name}", overrides=["+seed=7", *overrides]).data


def test_paper_mix_concatenates_its_parts_with_first_n(tmp_path):
    import numpy as np
    from PIL import Image

    overrides = []
    for name, count in (("div2k", 3), ("flickr2k", 2), ("lsdir", 4), ("ffhq", 5)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(tmp_path / name / f"{i}.png")
        overrides.append(f"data.train.parts.{name}.root={tmp_path / name}")
    overrides += ["data.train.parts.lsdir.first_n=2", "data.train.parts.ffhq.first_n=1", "data.crop_size=16"]
    dm = hydra.utils.instantiate(compose_data_named("paper_mix", *overrides))
    assert len(dm.train_set) == 3 + 2 + 2 + 1
    assert dm.train_set[(7, 0)]["hr"].shape == (3, 16, 16)
    assert type(dm.degradation).__name__ == "RealESRGANDegradation"


def test_crop_size_and_scale_must_agree_with_the_parts(sample_train):
    with pytest.raises(ValueError, match="data.crop_size=64"):
        make_dm(sample_train, crop_size=64)
    with pytest.raises(ValueError, match="multiple of data.scale"):
        make_dm(sample_train, crop_size=30)
    with pytest.raises(ValueError, match="differs from data.scale"):
        AddSRDataModule(sample_train, None, BicubicDegradation(2), scale=4, crop_size=32)


class _ValRecorder(_Recorder):
    def validation_step(self, batch, batch_idx):
        self.seen.append(batch)


def test_validation_batches_are_the_fixed_pairs_not_degraded(sample_train):
    from addsr_pl.data.datasets import SamplePairedDataset

    val = SamplePairedDataset(["chelsea", "rocket"], crop_size=32)
    dm = AddSRDataModule(
        sample_train, val, BicubicDegradation(4), crop_size=32, batch_size=2, val_batch_size=2
    )
    model = _ValRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(model, datamodule=dm)
    (batch,) = model.seen
    assert batch["name"] == ["chelsea", "rocket"]
    assert torch.equal(batch["lr"][1], val[1]["lr"]) and torch.equal(batch["hr"][0], val[0]["hr"])
    assert dm.batch_counter == 0


class _NumpyNoise(torch.utils.data.Dataset):
    """A third-party-style dataset that draws from NumPy's global RNG."""

    def __len__(self):
        return 8

    def __getitem__(self, item):
        import numpy as np

        return {"hr": torch.full((3, 8, 8), float(np.random.rand()))}  # noqa: NPY002 -- the point of the test


def test_workers_seed_global_rngs_reproducibly():
    def draws(seed):
        dm = AddSRDataModule(
            _NumpyNoise(), None, BicubicDegradation(4), crop_size=8, batch_size=2, seed=seed, num_workers=2
        )
        return torch.cat([b["hr"][:, 0, 0, 0] for b in dm.train_dataloader()])

    first, second = draws(3), draws(3)
    assert torch.equal(first, second)
    assert len(set(first.tolist())) == len(first)  # the two workers do not repeat each other
    assert not torch.equal(first, draws(4))


def _hr_folder(root, sizes):
    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def test_folder_holds_out_a_validation_split_by_seed(tmp_path):
    root = _hr_folder(tmp_path / "hr", [40] * 10)
    overrides = [f"data.train.root={root}", "data.crop_size=32", "data.val_count=3", "data.num_workers=0"]
    dm = hydra.utils.instantiate(compose_data_named("folder", *overrides))
    held = [p.name for p in dm.val_set.files]
    assert len(held) == 3 and len(dm.train_set) == 7
    assert not set(held) & {p.name for p in dm.train_set.files}
    item = dm.val_set[0]
    assert item["hr"].shape == (3, 32, 32) and item["lr"].shape == (3, 8, 8) and item["name"] == held[0][:-4]
    again = hydra.utils.instantiate(compose_data_named("folder", *overrides))
    assert [p.name for p in again.val_set.files] == held
    other = hydra.utils.instantiate(compose_data_named("folder", *overrides, "data.seed=8"))
    assert [p.name for p in other.val_set.files] != held
    given = hydra.utils.instantiate(compose_data_named("folder", *overrides, "data.val_count=0"))
    assert given.val_set is None and len(given.train_set) == 10


def test_folder_warns_once_about_images_smaller_than_the_crop(tmp_path):
    root = _hr_folder(tmp_path / "hr", [16, 20, 64, 64])
    overrides = [f"data.train.root={root}", "data.crop_size=32", "data.val_count=0", "data.batch_size=2"]
    with pytest.warns(UserWarning) as record:
        hydra.utils.instantiate(compose_data_named("folder", *overrides))
    messages = [str(w.message) for w in record if "smaller than" in str(w.message)]
    assert len(messages) == 1 and "2 of the 4 images" in messages[0] and "32x32" in messages[0]


def test_folder_cpu_is_folder_with_cpu_sizes():
    cpu, full = compose_data_named("folder_cpu"), compose_data_named("folder")
    assert cpu.crop_size < full.crop_size and cpu.num_workers == 0 and cpu.val_count > 0
    assert cpu.train._target_ == full.train._target_
