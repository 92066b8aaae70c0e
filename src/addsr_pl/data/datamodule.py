"""`AddSRDataModule`: HR crops from workers, degradation batched on the device, resumable order.

Reproducibility contract:

* The training order is a permutation drawn from ``(seed, epoch)``, sharded across ranks
  (`EpochShuffleSampler`); each item also carries its own draw seed from ``(seed, epoch, index)``,
  which fixes its crop and flip whatever worker reads it.
* The train loader (`ResumableDataLoader`) counts the batches it has handed out; Lightning stores
  that count in checkpoints and, on resume, the loader skips exactly those batches.
* Each training batch is degraded with a generator seeded from ``(seed, rank, batch counter)``;
  the counter is part of the data module's `state_dict`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from addsr_pl.data.datasets import (
    BAD_FILES_KEY,
    HeldOutPairedDataset,
    HRFolderDataset,
    collate_samples,
    hold_out,
)
from addsr_pl.data.rng import mix_seed


class EpochShuffleSampler(DistributedSampler):
    """Shuffled order from ``(seed, epoch)``, split across ranks; yields ``(index, draw_seed)`` keys.

    A `DistributedSampler` subclass, so Lightning keeps it instead of injecting its own. Ranks take
    interleaved slices of one permutation padded to a multiple of ``world_size``.
    `start` skips that many items of this rank's share (used when resuming mid-epoch).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        order += order[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        for index in mine[self.start :]:
            yield index, mix_seed(self.seed, self.epoch, index)


class BadFileLog:
    """Unreadable files seen so far; fails once they exceed `max_bad_fraction` of `total_files`."""

    def __init__(self, max_bad_fraction: float):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
        self.max_bad_fraction = max_bad_fraction
        self.total_files = 0
        self.paths: set[str] = set()

    def add(self, paths: list[str]) -> None:
        self.paths.update(paths)
        if self.total_files and len(self.paths) > self.max_bad_fraction * self.total_files:
            examples = ", ".join(sorted(self.paths)[:5])
            raise RuntimeError(
                f"{len(self.paths)} of {self.total_files} images are unreadable (more than "
                f"data.max_bad_fraction={self.max_bad_fraction}); e.g. {examples}. "
                "Remove or re-encode them, or raise data.max_bad_fraction."
            )


class ResumableDataLoader(DataLoader):
    """A `DataLoader` that reports skipped files and can resume in the middle of an epoch.

    ``state_dict()`` is ``{"epoch", "batches"}``: the sampler's epoch and how many batches of it this
    loader has yielded (Lightning's fetcher does not prefetch from loaders with a length, so yielded
    batches are consumed batches). After ``load_state_dict`` the next iteration over that epoch
    starts at that batch.

    The loader keeps its own epoch count: its first pass takes the sampler's epoch, each later pass
    the next one, and a restored position wins over the epoch Lightning sets. A run stopped at
    `max_steps` in mid-epoch is saved by Lightning as a finished epoch; its resume still continues
    that epoch at the saved batch instead of skipping the rest of it.
    """

    def __init__(self, *args, bad_file_log: BadFileLog | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_file_log = bad_file_log
        self._epoch = 0
        self._batches = 0
        self._passes = 0
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):  # saved at the end of an epoch: resume at the next one
            epoch, batches = epoch + 1, 0
        self._resume = (epoch, batches)

    def __iter__(self) -> Iterator:
        if self._resume is not None:
            sampler_epoch, skip = self._resume
        elif self._passes:
            sampler_epoch, skip = self._epoch + 1, 0
        else:
            sampler_epoch, skip = getattr(self.sampler, "epoch", 0), 0
        self._resume = None
        self._passes += 1
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(sampler_epoch)
        if isinstance(self.sampler, EpochShuffleSampler):
            self.sampler.start = skip * self.batch_size
        elif skip:
            raise RuntimeError("Resuming mid-epoch needs an EpochShuffleSampler.")
        self._epoch, self._batches = sampler_epoch, skip
        try:
            for batch in super().__iter__():
                self._batches += 1
                bad_files = batch.pop(BAD_FILES_KEY, []) if isinstance(batch, dict) else []
                if bad_files and self.bad_file_log is not None:
                    self.bad_file_log.add(bad_files)
                yield batch
        finally:
            if isinstance(self.sampler, EpochShuffleSampler):
                self.sampler.start = 0


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a worker from torch's per-worker seed.

    Our own datasets draw nothing from global RNGs; this keeps third-party transforms reproducible.
    PyTorch derives the worker's torch seed from the loader's generator, which the data module seeds
    from ``(seed, rank)``.
    """
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)  # noqa: NPY002 -- the global RNG is exactly what third-party code uses


class AddSRDataModule(pl.LightningDataModule):
    """Training crops degraded on the device, fixed validation/test pairs.

    Args:
        train: training dataset returning ``{"hr": [3, S, S]}`` (None for evaluation-only use).
        val: validation dataset returning ``{"hr", "lr", "name"}`` (fixed pairs), or None.
        degradation: module ``(hr, generator) -> (hr_target, lr)`` applied to training batches.
        scale: SR factor; must equal the degradation's.
        crop_size: HR crop side S; must be a multiple of `scale`.
        batch_size, val_batch_size: per-device batch sizes.
        num_workers, pin_memory, persistent_workers: passed to the DataLoaders.
        seed: base seed of the shuffling, crops and degradations.
        max_bad_fraction: share of unreadable training files tolerated before the run stops.
        test: test dataset (fixed pairs or LR-only); the validation set when None.
        val_count: with no `val`, hold out this many files of a folder training set (chosen by `seed`,
            never trained on) as validation pairs: centre crops and their bicubic LR; 0: none.
        rank, world_size: override the trainer's values (for use without a Trainer).
    """

    def __init__(
        self,
        train: Dataset | None,
        val: Dataset | None,
        degradation: nn.Module,
        scale: int = 4,
        crop_size: int = 512,
        batch_size: int = 6,
        val_batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
        test: Dataset | None = None,
        val_count: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if crop_size % scale:
            raise ValueError(f"data.crop_size={crop_size} must be a multiple of data.scale={scale}.")
        degradation_scale = getattr(degradation, "scale", scale)
        if degradation_scale != scale:
            raise ValueError(f"data.degradation.scale={degradation_scale} differs from data.scale={scale}.")
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"data.{key} must be at least 1, got {value}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}.")
        if val is None and val_count > 0:
            if not isinstance(train, HRFolderDataset):
                raise ValueError(
                    f"data.val_count={val_count} holds files out of a folder training set (data=folder); "
                    "set it to 0 or give data.val."
                )
            held_out = hold_out(train, val_count, mix_seed(seed, 0))
            val = HeldOutPairedDataset(held_out, train.root, crop_size, scale)
        self.train_set, self.val_set, self.test_set = train, val, test
        self.degradation = degradation
        self.scale, self.crop_size = scale, crop_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self._rank, self._world_size = rank, world_size
        self.batch_counter = 0
        self.bad_file_log = BadFileLog(max_bad_fraction)
        parts = getattr(train, "parts", [train])
        for part in parts:
            part_crop = getattr(part, "crop_size", crop_size)
            if part_crop != crop_size:
                raise ValueError(f"The training set crops {part_crop}² but data.crop_size={crop_size}.")
        self.bad_file_log.total_files = len(train) if train is not None else 0
        if train is not None and len(train) < batch_size:
            raise ValueError(
                f"The training set has {len(train)} items, fewer than one batch (data.batch_size={batch_size})."
            )

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def bad_files(self) -> list[str]:
        """Unreadable files met so far in this process (sorted); log ``len(dm.bad_files)``."""
        return sorted(self.bad_file_log.paths)

    def _loader(self, dataset: Dataset, sampler, batch_size: int, drop_last: bool) -> ResumableDataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_samples,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, self.rank)),
            bad_file_log=self.bad_file_log,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_set is None:
            raise ValueError(
                "This data module has no training set (data.train is null); set data.train to train."
            )
        sampler = EpochShuffleSampler(self.train_set, self.world_size, self.rank, self.seed)
        return self._loader(self.train_set, sampler, self.batch_size, drop_last=True)

    def _eval_loader(self, dataset: Dataset | None) -> ResumableDataLoader | list:
        if dataset is None:
            return []
        sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=False)
        return self._loader(dataset, sampler, self.val_batch_size, drop_last=False)

    def val_dataloader(self):
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        return self._eval_loader(self.test_set if self.test_set is not None else self.val_set)

    def degrade(self, batch: dict) -> dict:
        """Degrade one training batch with the generator of ``(seed, rank, batch counter)``."""
        hr = batch["hr"]
        gen = torch.Generator(device=hr.device).manual_seed(
            mix_seed(self.seed, self.rank, self.batch_counter)
        )
        self.batch_counter += 1
        with torch.no_grad():
            hr_target, lr = self.degradation(hr, gen)
        return {**batch, "hr": hr_target.contiguous(), "lr": lr.contiguous()}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training:
            return self.degrade(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"batch_counter": self.batch_counter}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batch_counter = int(state_dict["batch_counter"])
