"""The training progress bar: iterations, losses and it/s; log lines written above it."""

import logging
import sys

import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from pytorch_lightning.callbacks import ProgressBar
from tqdm import std as tqdm_std

from addsr_pl.callbacks import IterationProgressBar
from addsr_pl.train import build_callbacks

ITERATIONS = 3


class TwoOptimizerToy(pl.LightningModule):
    """A generator and a discriminator step per batch, logged like the AddSR module logs them."""

    def __init__(self, logger_name: str):
        super().__init__()
        self.automatic_optimization = False
        self.g = torch.nn.Linear(2, 1)
        self.d = torch.nn.Linear(2, 1)
        self.console = logging.getLogger(logger_name)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        losses = {}
        for name, net, opt in (("loss_g", self.g, opt_g), ("loss_d", self.d, opt_d)):
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            losses[name] = loss.detach()
        self.log("train/iteration", float(self.global_step // 2), prog_bar=True)
        self.log_dict(losses, prog_bar=True)
        self.console.info("message at batch %d", batch_idx)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.g.parameters(), lr=0.1), torch.optim.SGD(self.d.parameters(), lr=0.1)]

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)


def the_bar(callbacks) -> IterationProgressBar:
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], IterationProgressBar)
    return bars[0]


def test_the_bar_is_configured_per_stage_and_left_out_when_disabled(make_cfg):
    cfg = make_cfg()  # tests turn the bar off
    assert not [c for c in build_callbacks(cfg) if isinstance(c, ProgressBar)]
    for stage, steps in (("addsr", 2), ("teacher", 1)):
        cfg = make_cfg([f"stage={stage}"], sub=stage)
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = True
        assert the_bar(build_callbacks(cfg)).steps_per_iteration == steps


def test_the_bar_counts_iterations_shows_the_losses_and_logs_above_it(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = True
    bar = the_bar(build_callbacks(cfg))

    written = []
    original_write = tqdm_std.tqdm.write

    def recording_write(cls, s, file=None, end="\n", nolock=False):
        written.append(s)
        original_write(s, file=file, end=end, nolock=nolock)

    monkeypatch.setattr(tqdm_std.tqdm, "write", classmethod(recording_write))
    console = logging.getLogger("addsr_pl.test_progress_bar.console")
    handler = logging.StreamHandler(sys.stderr)
    console.addHandler(handler)
    console.setLevel(logging.INFO)
    console.propagate = False
    try:
        trainer = pl.Trainer(
            max_steps=ITERATIONS * bar.steps_per_iteration,  # as addsr_pl.train converts it
            callbacks=[bar], accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(TwoOptimizerToy(console.name))
    finally:
        console.removeHandler(handler)

    shown = bar.train_progress_bar
    assert shown.total == ITERATIONS and shown.n == ITERATIONS  # not batches of an epoch (`0/-2`)
    assert shown.desc.startswith("iteration")
    text = str(shown)
    assert f"{ITERATIONS}/{ITERATIONS}" in text and "it/s" in text
    assert "loss_g=" in text and "loss_d=" in text
    assert "v_num" not in text and "train/iteration" not in text
    # every log line of the run went through tqdm.write; the console handler is back afterwards
    assert [w for w in written if "message at batch" in w] == [
        f"message at batch {i}" for i in range(ITERATIONS)
    ]
    assert console.handlers == [] and bar._redirect is None


def test_a_resumed_run_starts_its_bar_at_the_iteration_it_resumes_from(make_cfg, tmp_path):
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = True

    def fit(iterations, ckpt_path=None):
        bar = the_bar(build_callbacks(cfg))
        trainer = pl.Trainer(
            max_steps=iterations * bar.steps_per_iteration, callbacks=[bar], accelerator="cpu",
            logger=False, enable_checkpointing=False, enable_model_summary=False,
            default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(TwoOptimizerToy("addsr_pl.test_progress_bar.quiet"), ckpt_path=ckpt_path)
        return trainer, bar.train_progress_bar

    first, _ = fit(2)
    first.save_checkpoint(tmp_path / "two.ckpt")
    _, shown = fit(ITERATIONS, tmp_path / "two.ckpt")
    assert (shown.initial, shown.n, shown.total) == (2, ITERATIONS, ITERATIONS)
