"""Each memory/speed lever of `method.memory` leaves the maths unchanged (tiny models, CPU)."""

import logging

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.loggers import CSVLogger

from addsr_pl.core.sampler import upscale
from addsr_pl.method.ema import EMA
from addsr_pl.method.losses import distillation_loss, generator_loss
from addsr_pl.method.memory import (
    decode_in_chunks,
    optimizer_options,
    shared_parameters,
)
from addsr_pl.method.memory_plan import GIB, module_memory_plan, report_memory_plan
from addsr_pl.method.module import AddSRModule
from addsr_pl.models.conditioning import PromptEncoder

from conftest import to_dicts

OFF = [
    "method.memory.share_frozen_weights=false",
    "method.memory.gradient_checkpointing=false",
    "method.memory.vae_gradient_checkpointing=false",
    "method.memory.teacher_decode_chunk=null",
    "method.memory.discriminator_batched=false",
]


def build(make_cfg, overrides=()):
    return AddSRModule(**to_dicts(make_cfg(["method.unroll_probs=[0,1]", *overrides])))


def generator_loss_and_grads(module, sample_pair):
    """The generator's Eq. 5 loss of one fixed draw and the gradients it gives the trained weights."""
    hr, lr = sample_pair
    g = torch.Generator().manual_seed(0)
    lr_up = upscale(lr, hr.shape[-2:])
    unroll = module.student_unroll(hr, lr_up, g, g)
    teacher_x0, teacher_t = module.teacher_targets(unroll, hr, g)
    loss = distillation_loss(
        unroll.graded.x0_image, teacher_x0, module.noise_schedule.distillation_weight(teacher_t)
    ).mean()
    c = module.discriminator.condition(lr_up)
    loss = loss + generator_loss(module.discriminator(unroll.graded.x0_image, c, g))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.student_trainable()}


def saved_bytes_and_result(fn, *args):
    """fn(*args) and the bytes autograd kept for backward meanwhile (checkpointed regions keep their own)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args)
    return sum(saved), result


def test_checkpointing_keeps_fewer_activations_and_gives_the_same_loss_and_gradients(make_cfg, sample_pair):
    plain = build(make_cfg, OFF)
    checkpointed = build(make_cfg, [*OFF[:1], *OFF[3:]])  # checkpointing on, nothing else
    assert checkpointed.student.unet.is_gradient_checkpointing
    assert checkpointed.codec.vae.is_gradient_checkpointing and not plain.codec.vae.is_gradient_checkpointing
    saved_plain, (loss_plain, grads_plain) = saved_bytes_and_result(
        generator_loss_and_grads, plain, sample_pair
    )
    saved_ckpt, (loss_ckpt, grads_ckpt) = saved_bytes_and_result(
        generator_loss_and_grads, checkpointed, sample_pair
    )
    assert saved_ckpt < 0.7 * saved_plain  # activations were dropped, to be recomputed in backward
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=1e-7)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_plain.values())


@pytest.mark.parametrize("trainable", ["official", "lora"])
def test_shared_frozen_weights_are_the_teachers_stay_bit_identical_and_get_no_gradient(
    make_cfg, sample_pair, trainable
):
    module = build(make_cfg, [f"method.trainable={trainable}"])
    copied = build(make_cfg, [f"method.trainable={trainable}", "method.memory.share_frozen_weights=false"])
    assert not shared_parameters(copied.student, copied.teacher)
    shared = shared_parameters(module.student, module.teacher)
    frozen = [n for n, p in module.student.named_parameters() if not p.requires_grad]
    assert shared == frozen and len(shared) > 0
    assert not any(p.requires_grad for p in module.teacher.parameters())
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}

    loss, _ = generator_loss_and_grads(module, sample_pair)
    loss_copied, _ = generator_loss_and_grads(copied, sample_pair)
    torch.testing.assert_close(loss, loss_copied, rtol=1e-6, atol=1e-7)
    trained_before = [p.detach().clone() for _, p in module.student_trainable()]
    optimizer = instantiate(module.method["optimizer_g"], params=[p for _, p in module.student_trainable()])
    optimizer.step()

    params = dict(module.student.named_parameters())
    assert all(params[n].grad is None for n in shared)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert shared == shared_parameters(module.student, module.teacher)  # still one storage
    assert all(not torch.equal(p, q) for (_, p), q in zip(module.student_trainable(), trained_before))
    module.cast_frozen(torch.bfloat16)  # casting the teacher casts the shared student weights with it
    assert all(params[n].dtype == torch.bfloat16 for n in shared)


def test_sharing_leaves_no_own_frozen_copy_in_the_memory_plan(make_cfg):
    shared = module_memory_plan(build(make_cfg))
    copied = module_memory_plan(build(make_cfg, ["method.memory.share_frozen_weights=false"]))
    row = {c.name: c for c in shared.components}
    row_copied = {c.name: c for c in copied.components}
    assert row["student (frozen, own)"].params_m == 0
    teacher = row["teacher UNet + ControlNet"]
    trained = row["student (trained)"]
    assert row_copied["student (frozen, own)"].params_m == pytest.approx(
        teacher.params_m - trained.trainable_m
    )
    assert copied.device_gib - shared.device_gib == pytest.approx(
        row_copied["student (frozen, own)"].weights_gib
    )


def test_memory_plan_counts_weights_grads_adamw_state_and_ema_per_trained_weight(make_cfg):
    module = build(make_cfg)
    n = sum(p.numel() for _, p in module.student_trainable())
    plan = module_memory_plan(module, capacity_gib=20.0)
    trained = next(c for c in plan.components if c.name == "student (trained)")
    assert trained.trainable_m == pytest.approx(n / 1e6)
    assert (trained.weights_gib, trained.grads_gib) == pytest.approx((4 * n / GIB, 4 * n / GIB))
    assert trained.optimizer_gib == pytest.approx(8 * n / GIB)
    assert trained.ema_gib == pytest.approx(4 * n / GIB)
    # every parameter of the module counted exactly once
    assert sum(c.params_m for c in plan.components) == pytest.approx(
        sum(p.numel() for p in module.parameters()) / 1e6
    )
    assert plan.headroom_gib == pytest.approx(20.0 - plan.device_gib)
    assert "student (trained)" in plan.table()

    host = build(make_cfg, ["method.memory.ema_placement=cpu", "method.memory.ema_dtype=bfloat16"])
    host_plan = module_memory_plan(host)
    assert host_plan.host_gib == pytest.approx(2 * n / GIB)
    assert host_plan.device_gib == pytest.approx(plan.device_gib - 4 * n / GIB)
    eight_bit = ["method.optimizer_g._target_=bitsandbytes.optim.AdamW8bit"]
    small = next(
        c for c in module_memory_plan(build(make_cfg, eight_bit)).components if c.name == trained.name
    )
    assert small.optimizer_gib < trained.optimizer_gib / 3


def random_weights(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"block.{i}.weight": torch.nn.Parameter(torch.randn(3 + i, 4, generator=g)) for i in range(n)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_foreach_ema_equals_the_per_tensor_ema(dtype):
    params = random_weights()
    ema = EMA(params, decay=0.9, dtype=dtype)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    expected = {n: p.detach().to(torch_dtype).clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        for n, p in params.items():
            expected[n].lerp_(p.detach().to(torch_dtype), 0.1)
    for n in params:
        assert ema.shadow(n).dtype == torch_dtype
        torch.testing.assert_close(ema.shadow(n), expected[n], rtol=0, atol=0)
        assert not torch.equal(ema.shadow(n).float(), params[n].detach())


def test_ema_keeps_its_dtype_and_a_cpu_ema_stays_on_the_cpu():
    device_ema = EMA(random_weights(), decay=0.9)
    device_ema.to(torch.float64)
    assert all(b.dtype == torch.float32 for b in device_ema.buffers())
    device_ema.to("meta")
    assert all(b.device.type == "meta" for b in device_ema.buffers())

    host_ema = EMA(random_weights(), decay=0.9, placement="cpu", dtype="bfloat16")
    before = {k: v.clone() for k, v in host_ema.state_dict().items()}
    host_ema.to("meta")
    host_ema.to(torch.float64)
    assert all(b.device.type == "cpu" and b.dtype == torch.bfloat16 for b in host_ema.buffers())
    restored = EMA(random_weights(seed=1), decay=0.9, placement="cpu", dtype="bfloat16")
    restored.load_state_dict(before)
    for key, value in before.items():
        assert torch.equal(restored.state_dict()[key], value)
    with pytest.raises(ValueError, match="ema_placement"):
        EMA(random_weights(), decay=0.9, placement="gpu")


def prompt_encoder(module, cache_size):
    encoder = module.conditioner.prompt_encoder
    return PromptEncoder(encoder.text_encoder, encoder.tokenizer, "fixed", "", "", cache_size=cache_size)


def test_the_bounded_prompt_cache_returns_the_same_embeddings_as_encoding_one_text_at_a_time(make_cfg):
    module = build(make_cfg)
    bounded, uncached = prompt_encoder(module, 2), prompt_encoder(module, 0)
    texts = ["a cat", "a dog", "a cat", "sky", "a tree", "a dog", "a cat", "sky"]
    single = {t: uncached.encode([t])[0] for t in set(texts)}
    for start in range(0, len(texts), 3):
        batch = texts[start : start + 3]
        got = bounded.encode(batch)
        for text, row in zip(batch, got):
            torch.testing.assert_close(row, single[text], rtol=1e-5, atol=1e-6)
        assert len(bounded._cache) <= 2
    assert {key[0] for key in bounded._cache} == {"a cat", "sky"}  # the two most recently used
    assert len(uncached._cache) == 0
    with pytest.raises(ValueError, match="prompt_cache_size"):
        prompt_encoder(module, -1)


def test_texts_missing_from_the_cache_are_encoded_in_one_call(make_cfg):
    module = build(make_cfg)
    encoder = prompt_encoder(module, 8)
    calls = []
    encoder.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    encoder.encode(["a", "b", "a", "c"])
    encoder.encode(["a", "d", "b"])
    assert calls == [3, 1]


def test_teacher_decode_in_chunks_equals_one_decode(make_cfg):
    module = build(make_cfg)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = module.codec.decode(latents)
        chunked = decode_in_chunks(module.codec, latents, 2)
    # batch-size-dependent conv kernels differ by float rounding (~2e-6); a wrong chunk would be O(1) off
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_one_discriminator_pass_over_real_and_fake_scores_each_as_two_passes(make_cfg):
    no_augment = ["model.discriminator.translation=0", "model.discriminator.cutout=0"]
    module = build(make_cfg, no_augment)
    d = module.discriminator.eval()  # spectral norm's power iteration would otherwise step once per pass
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    c = torch.randn(2, d.conditioner.embed_dim, generator=g)
    both = d(torch.cat([real, fake]), c.repeat(2, 1), g)
    torch.testing.assert_close(both, torch.cat([d(real, c, g), d(fake, c, g)]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_the_discriminator_crops_or_resizes_each_sample(make_cfg, crop_prob):
    module = build(make_cfg, ["model.discriminator.translation=0", "model.discriminator.cutout=0"])
    d = module.discriminator
    d.crop_prob = crop_prob
    images = torch.rand(3, 3, 40, 44, generator=torch.Generator().manual_seed(0))
    x = d._prepare(images, torch.Generator().manual_seed(1)) * d.std + d.mean
    if crop_prob == 0:
        resized = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
        torch.testing.assert_close(x, resized, rtol=1e-5, atol=1e-6)
        return
    offsets = []
    for sample, image in zip(x, images):
        found = [
            (top, left)
            for top in range(40 - 32 + 1)
            for left in range(44 - 32 + 1)
            if torch.allclose(sample, image[:, top : top + 32, left : left + 32], atol=1e-6)
        ]
        assert len(found) == 1
        offsets += found
    assert len(set(offsets)) > 1  # drawn per sample


def test_fused_adamw_only_on_cuda_and_the_8bit_adamw_is_a_choice(make_cfg):
    assert optimizer_options("torch.optim.AdamW", True, torch.device("cuda", 0)) == {"fused": True}
    assert optimizer_options("torch.optim.AdamW", False, torch.device("cuda", 0)) == {}
    assert optimizer_options("torch.optim.AdamW", True, torch.device("cpu")) == {}
    assert optimizer_options("bitsandbytes.optim.AdamW8bit", True, torch.device("cuda", 0)) == {}
    pytest.importorskip("bitsandbytes")
    module = build(make_cfg, ["method.optimizer_g._target_=bitsandbytes.optim.AdamW8bit"])
    (opt_g, _), _ = module.configure_optimizers()
    assert type(opt_g).__name__ == "AdamW8bit"


@pytest.mark.gpu
def test_the_discriminator_input_waits_for_no_host_sync(make_cfg):
    module = build(make_cfg).cuda()
    images = torch.rand(2, 3, 48, 48, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        module.discriminator._prepare(images, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.memory.teacher_decode_chunk=0", "teacher_decode_chunk"),
        ("method.memory.gradient_checkpointing=maybe", "gradient_checkpointing"),
        ("method.memory.ema_placement=gpu", "ema_placement"),
        ("method.memory.ema_dtype=float16", "ema_dtype"),
    ],
)
def test_bad_memory_values_are_named(make_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        build(make_cfg, [override])


def test_the_plan_is_printed_and_logged_with_the_hyperparameters_at_start_up(make_cfg, tmp_path, caplog):
    module = build(make_cfg)
    logger = CSVLogger(tmp_path)
    module.trainer = pl.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger="addsr_pl.method.memory_plan"):
        plan = report_memory_plan(module)
    assert "Static memory plan" in caplog.text and "share_frozen_weights=True" in caplog.text
    logged = logger.experiment.hparams["memory_plan"]
    assert logged["device_gib"] == pytest.approx(plan.device_gib)
    assert [c["name"] for c in logged["components"]] == [c.name for c in plan.components]


@pytest.mark.parametrize("outside", [True, False])
def test_the_frozen_vae_runs_in_its_weights_dtype_outside_autocast(make_cfg, sample_pair, outside):
    """Under bf16 autocast (CUDA runs GroupNorm in fp32 there) the VAE's GroupNorms see bf16 inputs with
    autocast off; the decoded images stay within bf16's resolution of the autocast decode."""
    module = build(make_cfg, [f"method.memory.vae_outside_autocast={str(outside).lower()}"])
    module.cast_frozen(torch.bfloat16)
    seen = []
    for norm in [m for m in module.codec.vae.modules() if isinstance(m, torch.nn.GroupNorm)]:
        norm.register_forward_pre_hook(
            lambda _, args: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu")))
        )
    hr, _ = sample_pair
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        latent = module.codec.encode(hr)
        image = module.codec.decode(latent)
    assert seen and all(dtype == torch.bfloat16 for dtype, _ in seen)
    assert {enabled for _, enabled in seen} == {not outside}
    assert latent.dtype == torch.bfloat16 and image.dtype == torch.float32
    module.codec.outside_autocast = not outside
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        other = module.codec.decode(latent)
    torch.testing.assert_close(image, other, atol=0.05, rtol=0)
