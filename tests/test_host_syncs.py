"""What makes the host wait for the GPU during a training iteration, counted on the CPU (tests/host_syncs.py).

An iteration may wait once, for the non-finite decision (`NonFiniteGuard.finish`); RAM's tags come to
the host in one copy per tagged batch; the logs and the progress bar read values only at their steps.
Anything more stalls the GPU's queue every iteration.
"""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from host_syncs import DeviceSyncCounter
from hydra.utils import instantiate

from addsr_pl.train import build_callbacks, build_module, build_trainer

from conftest import compose_train


class CountIteration(pl.Callback):
    """Counts from the start of batch `index` to its end; placed after the run's callbacks, so their ends
    of that batch are inside (the next batch's copy to the device is not: Lightning makes it non-blocking
    on CUDA)."""

    def __init__(self, index: int):
        self.index, self.counter = index, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            self.counter.__exit__(None, None, None)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx != self.index:
            return
        tensors = [*module.parameters(), *module.buffers(), *batch.values()]
        for optimizer in trainer.optimizers:  # Adam's `step` counters live on the host unless fused
            for state in optimizer.state.values():
                tensors += [v for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"]
        self.counter = DeviceSyncCounter(tensors)
        self.counter.__enter__()


def syncs_of_an_iteration(tmp_path, cache_dir, overrides: list[str]) -> list[tuple[str, str]]:
    """The host reads of device tensors in iteration 2 (of 3) of a tiny run, with the run's callbacks
    (progress bar on, logs every 10 steps: none at iteration 2)."""
    cfg = compose_train(
        tmp_path,
        ["trainer.max_steps=3", "trainer.log_every_n_steps=10", "trainer.limit_val_batches=0",
         "data.crop_size=32", *overrides],
        cache_dir,
    )  # fmt: skip
    cfg.trainer.enable_progress_bar = True
    count = CountIteration(index=1)
    trainer = build_trainer(cfg, [*build_callbacks(cfg), count], [])
    trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))
    return count.counter.syncs


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {"_local_scalar_dense": 1}),
        # tags of the upscaled LR (student) and of the HR (teacher), each batch in one copy
        (["model=tiny_seesr", "conditioning=tiny_ram"], {"_local_scalar_dense": 1, "cpu": 2}),
    ],
    ids=["fixed_prompt", "ram_tags"],
)
def test_an_iteration_waits_for_the_device_once_plus_one_copy_per_tagged_batch(
    tmp_path, cache_dir, overrides, expected
):
    syncs = syncs_of_an_iteration(tmp_path, cache_dir, overrides)
    found = {}
    for what, _ in syncs:
        found[what] = found.get(what, 0) + 1
    assert found == expected, "\n".join(map(str, syncs))
    assert [where for what, where in syncs if what == "_local_scalar_dense"] == [
        next(where for what, where in syncs if "nonfinite.py" in where)
    ]


class WarnOnSyncs(pl.Callback):
    """CUDA's own account: `torch.cuda.set_sync_debug_mode("warn")` during batch `index`."""

    def __init__(self, index: int):
        self.index, self.caught, self._catcher = index, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.index:
            self._catcher = warnings.catch_warnings(record=True)
            self.caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)


@pytest.mark.gpu
def test_on_cuda_an_iteration_synchronizes_once(tmp_path, cache_dir):
    cfg = compose_train(
        tmp_path,
        ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "trainer.max_steps=3",
         "trainer.log_every_n_steps=10", "trainer.limit_val_batches=0", "data.crop_size=32",
         # the frozen half's CUDA graphs as by default; compiled, the same code in fewer kernels (its compile
         # would take most of the GPU check's test section)
         "method.speed.compile=none", "method.speed.cuda_graph=true"],
        cache_dir,
    )  # fmt: skip
    cfg.trainer.enable_progress_bar = True
    watch = WarnOnSyncs(index=1)
    trainer = build_trainer(cfg, [*build_callbacks(cfg), watch], [])
    trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))
    syncs = [str(w.message) for w in watch.caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
