"""`method.memory.plan`: the choice from measurements given as data, and the plan of a CPU run."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from addsr_pl.method.lever_plan import (
    PLAN_LEVERS,
    Measurement,
    PlanError,
    choose_levers,
    lever_candidates,
    manual_levers,
    predict,
    probe_micro_batches,
)
from addsr_pl.method.lever_probe import kept_plan, measure, plan_for_run, set_levers
from addsr_pl.method.memory_plan import module_memory_plan
from addsr_pl.method.module import AddSRModule
from addsr_pl.train import train

from conftest import to_dicts

STATIC_GIB = 12.0
MANUAL = {"gradient_checkpointing": True, "vae_gradient_checkpointing": True, "teacher_decode_chunk": 2}
AUTO_MEMORY = {k: "auto" for k in (*PLAN_LEVERS, "micro_batch")} | {"manual": MANUAL}


def probe(memory: dict, effective: int) -> list[Measurement]:
    """What a probe of a SeeSR-like run would measure: per sample, checkpointing saves 3 GiB of the 6 the
    activations take, the VAE's checkpointing and the chunked decode 0.5 GiB each; each costs time."""
    points = []
    for levers in lever_candidates(memory):
        gc, vae, chunk = (levers[k] for k in PLAN_LEVERS)
        per_sample_gib = 6.0 - 3.0 * gc - 0.5 * vae - 0.5 * (chunk is not None)
        per_sample_s = 0.2 + 0.05 * gc + 0.02 * vae + 0.01 * (chunk is not None)
        for b in probe_micro_batches(effective, memory["micro_batch"]):
            points.append(Measurement(levers, b, STATIC_GIB + per_sample_gib * b, 0.9 + per_sample_s * b))
    return points


def choose(cap_gib: float, effective: int = 8, memory: dict = AUTO_MEMORY, set_by_user=()):
    return choose_levers(
        probe(memory, effective),
        STATIC_GIB,
        cap_gib,
        2.0,
        effective,
        memory["micro_batch"],
        list(set_by_user),
    )


def test_where_everything_fits_the_plan_turns_checkpointing_off_decodes_in_one_call_at_the_largest_batch():
    choice = choose(cap_gib=80.0)
    assert choice.levers == {
        "gradient_checkpointing": False,
        "vae_gradient_checkpointing": False,
        "teacher_decode_chunk": None,
    }
    assert (choice.micro_batch, choice.accumulate) == (8, 1)
    # predicted from the probe's two micro-batches (1 and 2): 12 GiB static + 6 GiB per sample
    assert choice.predicted_peak_gib == pytest.approx(60.0)
    assert choice.samples_per_s == pytest.approx(8 / (0.9 + 0.2 * 8))
    table = choice.table()
    assert "8 x 1" in table and "predicted peak 60.00 GiB" in table


def test_under_a_tight_cap_the_plan_checkpoints_and_accumulates_smaller_micro_batches():
    # 26 GiB for the run: without checkpointing only micro-batch 2 fits (24 GiB, 1.54 samples/s); with the
    # student's checkpointing micro-batch 4 does (24 GiB, 2.11 samples/s), and nothing fits at 8
    choice = choose(cap_gib=28.0)
    assert choice.levers == {
        "gradient_checkpointing": True,
        "vae_gradient_checkpointing": False,
        "teacher_decode_chunk": None,
    }
    assert (choice.micro_batch, choice.accumulate) == (4, 2)
    assert choice.predicted_peak_gib == pytest.approx(24.0) and choice.predicted_peak_gib <= 26.0
    assert choice.reasons["gradient_checkpointing"].startswith("the other value needs 36.0 GiB")
    assert choice.reasons["vae_gradient_checkpointing"] == "fits, and the other value is slower"


def test_when_nothing_fits_the_error_names_the_cap_the_leanest_need_and_the_fix():
    with pytest.raises(PlanError) as error:
        choose(cap_gib=14.0)
    message = str(error.value)
    assert "memory_cap = 14.0 GiB" in message
    # the leanest: every lever on, micro-batch 1: 12 + 2 GiB
    assert "at micro-batch 1) needs 14.00 GiB" in message
    assert "method.memory.plan=manual" in message and "data.crop_size" in message


def test_settings_you_made_are_kept_and_shown_as_yours():
    memory = AUTO_MEMORY | {"gradient_checkpointing": True, "micro_batch": 2}
    assert all(c["gradient_checkpointing"] is True for c in lever_candidates(memory))
    assert probe_micro_batches(8, memory["micro_batch"]) == [2]
    choice = choose(80.0, memory=memory, set_by_user=["gradient_checkpointing", "micro_batch"])
    assert choice.levers["gradient_checkpointing"] is True
    assert (choice.micro_batch, choice.accumulate) == (2, 4)
    assert choice.reasons["gradient_checkpointing"] == "set by you"
    assert choice.reasons["micro-batch x accumulation"] == "set by you"
    assert choice.levers["teacher_decode_chunk"] is None  # still the plan's


def test_among_equal_rates_the_lower_peak_wins():
    one_call, chunked = (dict(zip(PLAN_LEVERS, (True, True, chunk))) for chunk in (None, 2))
    points = [
        Measurement(levers, b, 20.0 + b - (levers is chunked), 1.0)
        for levers in (one_call, chunked)
        for b in (1, 2)
    ]
    choice = choose_levers(points, STATIC_GIB, 80.0, 2.0, 2, "auto", [])
    assert choice.levers == chunked and choice.micro_batch == 2
    same = [Measurement(levers, b, 20.0, 1.0) for levers in (one_call, chunked) for b in (1, 2)]
    assert choose_levers(same, STATIC_GIB, 80.0, 2.0, 2, "auto", []).micro_batch == 2


def test_a_micro_batch_that_ran_out_of_memory_rules_out_every_larger_one():
    levers = dict(zip(PLAN_LEVERS, (False, False, None)))
    points = [Measurement(levers, 1, 20.0, 1.0), Measurement(levers, 2, math.inf, math.inf)]
    assert predict(points, 1) == (20.0, 1.0)
    assert math.isinf(predict(points, 4)[0])
    assert predict(points[:1], 4) is None  # one micro-batch gives no line


def test_a_resumed_run_keeps_its_checkpoints_choice_under_the_values_set_now():
    saved = choose(cap_gib=28.0).as_dict()  # 4 x 2, checkpointing on
    memory = AUTO_MEMORY | {"teacher_decode_chunk": 2}
    kept = kept_plan(saved, memory, effective=8)
    assert (kept.micro_batch, kept.accumulate) == (4, 2) and kept.levers["gradient_checkpointing"] is True
    assert kept.levers["teacher_decode_chunk"] == 2 and kept.reasons["teacher_decode_chunk"] == "set by you"
    assert kept_plan(saved, AUTO_MEMORY | {"micro_batch": 2}, effective=8).accumulate == 4
    assert kept_plan(saved, AUTO_MEMORY, effective=6) is None  # another effective batch: probe again
    assert kept_plan(None, AUTO_MEMORY, effective=8) is None


def test_manual_values_fill_only_the_levers_left_auto():
    memory = AUTO_MEMORY | {"teacher_decode_chunk": None}
    assert {k: manual_levers(memory)[k] for k in PLAN_LEVERS} == MANUAL | {"teacher_decode_chunk": None}


def test_on_the_cpu_auto_says_so_and_the_micro_batch_reaches_data_and_accumulation(make_cfg, capsys):
    defaults = make_cfg(sub="defaults").method.memory
    assert defaults.plan == "auto" and {defaults[k] for k in (*PLAN_LEVERS, "micro_batch")} == {"auto"}
    cfg = make_cfg(["data.batch_size=4", "method.accumulate_grad_batches=2", "method.memory.micro_batch=2"])
    choice = plan_for_run(cfg)
    assert "method.memory.plan=auto applies on CUDA only" in capsys.readouterr().out
    assert (cfg.data.batch_size, cfg.method.accumulate_grad_batches) == (2, 4)  # effective batch 8 kept
    assert {k: cfg.method.memory[k] for k in PLAN_LEVERS} == MANUAL == choice.levers
    with pytest.raises(PlanError, match="micro_batch = 3: must divide the effective batch"):
        plan_for_run(make_cfg(["data.batch_size=4", "method.memory.micro_batch=3"], sub="bad"))


def test_a_run_split_into_micro_batches_counts_iterations_as_optimizer_steps(make_cfg):
    cfg = make_cfg(
        [
            "data.crop_size=32",
            "data.batch_size=2",
            "method.memory.micro_batch=1",
            "trainer.limit_val_batches=0",
            "trainer.max_steps=2",
            "export_student=false",
        ]
    )
    result = train(cfg)
    module, datamodule = result["module"], result["datamodule"]
    assert datamodule.batch_size == 1
    assert module.method["accumulate_grad_batches"] == 2
    assert int(module.iteration) == 2 and module.micro_step == 4
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    plan = ckpt["addsr_config"]["lever_plan"]
    assert (plan["micro_batch"], plan["accumulate_grad_batches"], plan["mode"]) == (1, 2, "cpu")
    # logged with the hyperparameters, as the memory plan is
    hparams = yaml.safe_load((Path(cfg.paths.output_dir) / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["lever_plan"] == plan


def test_the_probe_switches_the_levers_of_a_built_module(make_cfg):
    module = AddSRModule(**to_dicts(make_cfg()))
    assert module.student.unet.is_gradient_checkpointing  # auto outside a run's plan: the manual values
    set_levers(module, dict(zip(PLAN_LEVERS, (False, False, None))))
    assert not module.student.unet.is_gradient_checkpointing
    assert not module.student.controlnet.is_gradient_checkpointing
    assert not module.codec.vae.is_gradient_checkpointing
    assert module.method["memory"]["teacher_decode_chunk"] is None
    set_levers(module, dict(zip(PLAN_LEVERS, (True, True, 2))))
    assert module.student.controlnet.is_gradient_checkpointing and module.codec.vae.is_gradient_checkpointing
    assert module.method["memory"]["teacher_decode_chunk"] == 2


@pytest.mark.gpu
def test_the_probe_on_cuda_measures_chooses_within_the_cap_and_gives_its_memory_back(make_cfg):
    # two candidates (the student's checkpointing on and off) at micro-batches 1 and 2 of batch 2
    cfg = make_cfg(
        [
            "data.crop_size=32",
            "data.batch_size=2",
            "trainer=gpu",
            "method.memory.vae_gradient_checkpointing=true",
            "method.memory.teacher_decode_chunk=2",
        ]
    )
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    choice = plan_for_run(cfg)
    assert choice.mode == "auto"
    cap = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert choice.cap_gib == pytest.approx(cap)
    assert 0 < choice.static_gib < choice.predicted_peak_gib <= cap - 2.0
    assert choice.micro_batch * choice.accumulate == 2
    assert (cfg.data.batch_size, cfg.method.accumulate_grad_batches) == (
        choice.micro_batch,
        choice.accumulate,
    )
    assert cfg.method.memory.gradient_checkpointing == choice.levers["gradient_checkpointing"]
    assert choice.reasons["vae_gradient_checkpointing"] == "set by you"
    # the probe's module, gradients and optimizer state are gone
    assert torch.cuda.memory_allocated() - before < 2**20


@pytest.mark.gpu
def test_a_probe_point_reads_the_peak_of_real_iterations(make_cfg):
    cfg = make_cfg(["data.crop_size=32", "trainer=gpu"])
    module = AddSRModule(**to_dicts(cfg))
    probe = {"warmup": 1, "iterations": 1}
    off = dict(zip(PLAN_LEVERS, (False, False, None)))
    small, large = (measure(module, off, b, 32, 4, "bf16-mixed", probe) for b in (1, 4))
    assert 0 < small.peak_gib < large.peak_gib < math.inf and 0 < small.seconds < math.inf
    static = module_memory_plan(module).device_gib
    assert small.peak_gib > static  # the weights, their gradients and AdamW's moments were on the device
