"""AddSRModule: student, frozen teacher and discriminator, trained by manual G/D optimisation (paper Fig. 2)."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from addsr_pl.core.sampler import StudentStep, sample_student, upscale
from addsr_pl.inference.pipeline import AddSRPipeline
from addsr_pl.logging import log_where_computed, logging_step
from addsr_pl.method.checkpointing import TrainedStateCheckpoint
from addsr_pl.method.distributed import SyncedParts
from addsr_pl.method.ema import EMA
from addsr_pl.method.lever_plan import with_manual_levers
from addsr_pl.method.losses import (
    discriminator_hinge_loss,
    distillation_loss,
    generator_loss,
    sample_unroll,
    ta_continuous,
    ta_step_index,
    ta_weights,
)
from addsr_pl.method.memory import (
    check_memory_config,
    copy_sharing_frozen,
    decode_in_chunks,
    optimizer_options,
    switch_gradient_checkpointing,
)
from addsr_pl.method.memory_plan import report_memory_plan
from addsr_pl.method.nonfinite import NonFiniteGuard, step_alone, step_apart
from addsr_pl.method.speed import FrozenRegion, TrainingSpeed, apply_training_speed
from addsr_pl.models.backbones import backbone, component_parts
from addsr_pl.models.conditioning import Conditioning
from addsr_pl.models.vae import VaeCodec

PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, rank, step) streams never collide or repeat."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Unroll:
    """One training unroll of the student."""

    steps: list[StudentStep]
    k: int
    start: Tensor  # [B] index of the first student timestep
    noise: Tensor  # the graded step's noise, reused by the teacher
    lr_up: Tensor
    text_embeds: Tensor
    blank: Tensor  # [B] samples whose prompt was dropped
    start_host: Tensor | None = None  # `start` on the CPU, where it was drawn: read without a device sync

    @property
    def graded(self) -> StudentStep:
        return self.steps[-1]


class AddSRModule(TrainedStateCheckpoint, pl.LightningModule):
    """Adversarial diffusion distillation of a ControlNet SR teacher into a few-step student.

    Args:
        model: the `model` config group as a plain dict (components, discriminator).
        conditioning: the `conditioning` group (prompt source and strings, tagger).
        method: the `method` config group as a plain dict (every number of the method).
        seed: the run's seed; random draws of step n on rank r come from (seed, r, n).
    """

    MICRO_STEP_KEY = "addsr_micro_step"

    def __init__(self, model: dict, conditioning: dict, method: dict, seed: int = 0):
        super().__init__()
        # levers still `auto` (a module built outside a training run's plan) take the manual values; the
        # hyper-parameters record the values in force
        method = with_manual_levers(method)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trained weights; see on_load_checkpoint
        self.method = method
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(
                seed
            )  # random-initialised parts (tiny models, heads) are the same in every process
            self.build(model, conditioning, method)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.micro_step = 0
        # `fault.nan_loss_at_iteration` sets `nonfinite.inject_at_iteration` (addsr_pl.train)
        self.nonfinite = NonFiniteGuard(method["max_consecutive_nonfinite"])
        # under DDP, the student's and the discriminator's own wrappers (`wrap_for_ddp`); not submodules
        self.synced = SyncedParts()
        self.allreduced_bytes = 0  # by the last iteration
        self.use_speed(TrainingSpeed.eager())  # `setup` applies `method.speed` for the trainer's device

    def build(self, model: dict, conditioning: dict, method: dict) -> None:
        components = instantiate(model["components"], _convert_="all")
        self.backbone = backbone(components.backbone)
        parts = component_parts(components)
        self.noise_schedule = self.backbone.noise_schedule(parts, "AddSR")
        # the frozen components an exported student names, and where each came from
        self.frozen_parts = {name: parts[name] for name in self.backbone.frozen}
        self.component_sources = components.sources
        # the config's timesteps are DDPM's (the paper's); the schedule's own form is used from here on
        ddpm_timesteps = torch.tensor(method["student_timesteps"])
        self.register_buffer(
            "student_timesteps", self.noise_schedule.from_ddpm(ddpm_timesteps), persistent=False
        )
        self.codec = VaeCodec(components.vae, method["memory"]["vae_outside_autocast"])
        self.conditioner = self.backbone.conditioner(parts, conditioning)
        networks = {name: parts[name] for name in self.backbone.networks}
        self.teacher = self.backbone.denoiser(networks, self.codec, method["conditioning_scale"])
        memory = method["memory"]
        check_memory_config(memory)
        trained = (
            self.backbone.trained_parameter_ids(networks, method["trainable"])
            if memory["share_frozen_weights"]
            else {id(p) for p in self.teacher.parameters()}
        )
        student_networks = {name: copy_sharing_frozen(net, trained) for name, net in networks.items()}
        self.student = self.backbone.denoiser(student_networks, self.codec, method["conditioning_scale"])
        self.discriminator = instantiate(model["discriminator"], _convert_="all")
        for frozen in (self.teacher, self.codec, self.conditioner):
            frozen.requires_grad_(False).eval()
        self.backbone.select_trainable(student_networks, method["trainable"], method["lora"])
        switch_gradient_checkpointing(student_networks.values(), self.codec, memory)
        self.ema = EMA(
            dict(self.student_trainable()), method["ema_decay"], memory["ema_placement"], memory["ema_dtype"]
        )
        # Every rank applies the same all-reduced update to its EMA, so DDP need not broadcast the shadows
        # at each forward (nor could it from the CPU).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f"ema.{name}" for name, _ in self.ema.named_buffers()]
        )
        ta = ta_weights(method["ta_schedule"], len(method["student_timesteps"]), **method["ta"])
        self.register_buffer("ta", ta.float(), persistent=False)  # from the config, never from a checkpoint
        # the DDPM timesteps TA's continuous form is interpolated over
        self.register_buffer("ta_timesteps", ddpm_timesteps.double(), persistent=False)

    # ----------------------------------------------------------------- parameters and precision
    def student_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def discriminator_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.discriminator.named_parameters() if p.requires_grad]

    def setup(self, stage: str) -> None:
        """Frozen parts in the compute dtype of the trainer's precision; trained weights stay fp32; the
        speed settings of `method.speed` for the trainer's device."""
        dtype = PRECISION_DTYPES.get(str(self.trainer.precision), torch.float32)
        device = self.trainer.strategy.root_device
        speed = TrainingSpeed.for_device(self.method["speed"], device)
        self.cast_frozen(dtype, tagger=speed.tagger_in_compute_dtype)
        if speed != self.speed:  # a second fit of this module keeps what the first one compiled
            apply_training_speed(self, speed, device)
            self.use_speed(speed)
        report_memory_plan(self)

    def use_speed(self, speed: TrainingSpeed) -> None:
        """The frozen half's regions (method/speed.py): eager, compiled or CUDA-graphed by `speed`."""
        self.speed = speed
        self.frozen_encode = FrozenRegion(lambda images, _: self.codec.encode(images[0]), speed)
        self.frozen_teacher_x0 = FrozenRegion(self.teacher_x0, speed)
        self.frozen_condition = FrozenRegion(lambda images, _: self.discriminator.condition(images[0]), speed)

    def cast_frozen(self, dtype: torch.dtype, tagger: bool = False) -> None:
        """The frozen parts in `dtype`; the tagger too with `tagger` (`method.speed.tagger_in_compute_dtype`,
        its per-tag thresholds stay fp32), else in its configured dtype (conditioning.tagger.dtype)."""
        taggers = [t for t in (self.conditioner.tagger, self.conditioner.train_tagger) if t is not None]
        for module in (
            self.teacher,
            self.codec,
            self.conditioner.prompt_encoder,
            self.discriminator.backbone,
            *(taggers if tagger else []),
        ):
            module.to(dtype)
        self.discriminator.conditioner.to(dtype)
        for p in self.student.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def train(self, mode: bool = True) -> AddSRModule:
        super().train(mode)
        for frozen in (self.teacher, self.codec, self.conditioner):
            frozen.eval()
        return self

    # ----------------------------------------------------------------- randomness
    def generators(self) -> tuple[torch.Generator, torch.Generator]:
        """(CPU, device) generators of this micro-step, seeded from (seed, rank, micro-step)."""
        s = mix_seed(self.seed, self.global_rank, self.micro_step)
        cpu = torch.Generator().manual_seed(s)
        dev = torch.Generator(device=self.device).manual_seed(s) if self.device.type != "cpu" else cpu
        return cpu, dev

    # ----------------------------------------------------------------- Fig. 2, box by box
    def student_unroll(
        self, hr: Tensor, lr_up: Tensor, g_cpu: torch.Generator, g_dev: torch.Generator
    ) -> Unroll:
        """k student steps with PSR; only the last (graded) step has a graph."""
        m = self.method
        n = len(m["student_timesteps"])
        k, start = sample_unroll(
            torch.tensor(m["unroll_probs"], dtype=torch.float), n, hr.shape[0], m["unroll_start"], g_cpu
        )
        index = (start.unsqueeze(1) + torch.arange(k)).to(self.device, non_blocking=True)
        timesteps = self.student_timesteps[index]
        blank = torch.rand(hr.shape[0], generator=g_cpu) < m["null_text_ratio"]
        prompt_source = {"hr": hr, "lr": lr_up}[m["student_prompt_source"]]
        text_embeds = self.conditioner.text_embeds(prompt_source, blank, training=True)
        hr_latent = self.frozen_encode([hr])
        start_latent = hr_latent if m["student_start"] == "hr" else self.frozen_encode([lr_up])
        noises = [
            torch.randn(start_latent.shape, generator=g_dev, device=self.device, dtype=start_latent.dtype)
        ]
        for _ in range(k - 1):
            noises.append(
                noises[0]
                if m["shared_noise"]
                else torch.randn(
                    start_latent.shape, generator=g_dev, device=self.device, dtype=start_latent.dtype
                )
            )
        steps = sample_student(
            self.synced.get(self.student),
            self.codec,
            lr_up=lr_up,
            text_embeds=text_embeds,
            represent=self.conditioner.represent,
            timesteps=timesteps,
            noises=noises,
            noise_schedule=self.noise_schedule,
            start_latent=start_latent,
            psr=m["psr"],
            psr_weight=m["psr_weight"],
            reference_latent=hr_latent if m["unroll_renoise"] == "hr" else None,
            grad_last=True,
            decode_last=True,
        )
        return Unroll(
            steps, k, start.to(self.device, non_blocking=True), noises[-1], lr_up, text_embeds, blank, start
        )

    @torch.no_grad()
    def teacher_targets(self, unroll: Unroll, hr: Tensor, g_dev: torch.Generator) -> tuple[Tensor, Tensor]:
        """Teacher x0 at n random t per sample on the re-noised student x0, in one batched forward.

        `teacher_condition: hr` (IQ-ADD) gives the teacher the HR image as control image, prompt and
        representation source; `lr` gives it the upscaled LR, as the student sees. The paper's Table 4
        splits the two: `teacher_control_image` and `teacher_prompt_source` (hr|lr) override each.
        """
        m = self.method
        n = m["teacher_timesteps_per_sample"]
        x0 = unroll.graded.x0_latent.detach()
        b = x0.shape[0]
        low, high = m["teacher_timestep_range"]
        t = self.noise_schedule.from_ddpm(
            torch.randint(low, high, (b * n,), generator=g_dev, device=self.device)
        )
        image = {"hr": hr, "lr": unroll.lr_up}
        control = image[m["teacher_control_image"] or m["teacher_condition"]]
        prompt_source = image[m["teacher_prompt_source"] or m["teacher_condition"]]
        image_prompt = self.conditioner.prompt_encoder.prompt == "tags"
        text = (
            self.conditioner.text_embeds(prompt_source, unroll.blank, training=True)
            if image_prompt
            else unroll.text_embeds
        )
        representation = self.conditioner.represent(prompt_source)
        x0_teacher = self.frozen_teacher_x0([x0, unroll.noise, t, control, text, representation], (n,))
        return x0_teacher, t

    def teacher_x0(self, tensors: list[Tensor | None], constants: tuple[int]) -> Tensor:
        """The teacher's x0 of the student's x0 re-noised at `t` (n per sample; `teacher_targets`): a
        function of tensors, so `method.speed` may compile it and capture it as a CUDA graph."""
        x0, noise, t, control, text, representation = tensors
        (n,) = constants
        z_t = self.noise_schedule.add_noise(x0.repeat_interleave(n, 0), noise.repeat_interleave(n, 0), t)
        conditioning = Conditioning(text, representation).repeat(n)
        prediction = self.teacher(
            z_t, self.noise_schedule.model_timestep(t), control.repeat_interleave(n, 0), conditioning
        )
        x0_teacher = self.noise_schedule.predict_x0(z_t, prediction, t)
        if self.method["distill_space"] == "pixel":
            chunk = self.method["memory"]["teacher_decode_chunk"]
            x0_teacher = decode_in_chunks(self.codec, x0_teacher, chunk).clamp(0, 1)
        return x0_teacher

    def ta_weight(self, unroll: Unroll) -> Tensor:
        """TA's gamma per sample (Eq. 5): of the graded step's index (`method.ta_form: step`, the paper's) or
        gamma(t) of its timestep, read as a DDPM t (`continuous`)."""
        m = self.method
        graded_index = unroll.start + unroll.k - 1
        if m["ta_form"] == "continuous":
            t = self.noise_schedule.ddpm_time(self.student_timesteps[graded_index])
            return ta_continuous(t, self.ta_timesteps, self.ta, m["ta_schedule"], m["ta"]["exponential"])
        n_steps = len(m["student_timesteps"])
        return self.ta[ta_step_index(graded_index, unroll.start, unroll.k, n_steps, m["ta_indexing"])]

    def generator_step(
        self, unroll: Unroll, targets: tuple[Tensor, Tensor], c: Tensor, g_dev, last_micro: bool
    ) -> dict:
        """Student update: TA-weighted distillation + lambda_adv * adversarial loss (Eq. 5)."""
        m = self.method
        opt_g, _ = self.optimizers()
        graded = unroll.graded
        n_steps = len(m["student_timesteps"])
        ta_weight = self.ta_weight(unroll)
        teacher_x0, teacher_t = targets
        with self.toggled_optimizer(opt_g):
            student_x0 = graded.x0_image if m["distill_space"] == "pixel" else graded.x0_latent
            c_t = self.noise_schedule.distillation_weight(teacher_t)
            per_sample = distillation_loss(student_x0, teacher_x0, c_t)
            loss_dis = (per_sample * ta_weight).mean()
            loss_dis = self.nonfinite.inject(loss_dis, self)
            loss_adv = generator_loss(self.discriminator(graded.x0_image, c, g_dev))
            loss = loss_dis + m["lambda_adv"] * loss_adv
            self.nonfinite.check_loss("loss_dis", loss_dis)
            self.nonfinite.check_loss("loss_g_adv", loss_adv)
            self.manual_backward(loss / self.loss_denominator())
        logs = {
            "loss_dis": loss_dis,
            "loss_g_adv": loss_adv,
            "loss_g": loss,
            "ta_weight": ta_weight.mean(),
        }
        graded_host = unroll.start_host + unroll.k - 1  # on the CPU: choosing the logs waits for no kernel
        for s in range(n_steps):
            members = (graded_host == s).nonzero().flatten()
            if len(members):
                index = members.to(self.device, non_blocking=True)
                logs[f"loss_dis_step{s + 1}"] = per_sample.index_select(0, index).mean()
        return logs

    def discriminator_step(self, unroll: Unroll, hr: Tensor, c: Tensor, g_dev, last_micro: bool) -> dict:
        """Discriminator update: hinge loss on the HR target (real) and the student x0 (fake)."""
        _, opt_d = self.optimizers()
        with self.toggled_optimizer(opt_d):
            x0_image = unroll.graded.x0_image.detach()
            if self.method["memory"]["discriminator_batched"]:  # one backbone pass over real and fake
                both = self.synced.get(self.discriminator)(
                    torch.cat([hr.to(x0_image.dtype), x0_image]), c.repeat(2, 1), g_dev
                )
                real, fake = both.chunk(2)
            else:
                real = self.discriminator(hr, c, g_dev)
                # through the wrapper last: DDP readies its all-reduce at the forward before the backward,
                # which reduces the heads' gradients of both passes (each weight's, summed, arrives once)
                fake = self.synced.get(self.discriminator)(x0_image, c, g_dev)
            loss_d = discriminator_hinge_loss(real, fake)
            self.nonfinite.check_loss("loss_d", loss_d)
            self.manual_backward(loss_d / self.loss_denominator())
        return {"loss_d": loss_d, "d_real": real.mean(), "d_fake": fake.mean()}

    def loss_denominator(self) -> float:
        """Each loss is divided by this before its backward: the micro-batches accumulated into one
        optimizer step times `method.loss_divisor` (official: 2, see conf/method/addsr.yaml)."""
        return self.method["accumulate_grad_batches"] * self.method["loss_divisor"]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hr, lr = batch["hr"], batch["lr"]
        g_cpu, g_dev = self.generators()
        last_micro = (self.micro_step + 1) % self.method["accumulate_grad_batches"] == 0
        self.synced.sync_gradients(last_micro)  # the micro-steps before the last accumulate locally
        lr_up = upscale(lr, hr.shape[-2:])
        with self.conditioner.one_pass_per_image():
            unroll = self.student_unroll(hr, lr_up, g_cpu, g_dev)
            targets = self.teacher_targets(unroll, hr, g_dev)
        c = self.frozen_condition([lr_up])
        undo_d = None
        if self.method["gd_order"] == "discriminator_first":
            # the official order: D steps on this batch's x0 first, then G faces the updated D
            logs = self.discriminator_step(unroll, hr, c, g_dev, last_micro)
            if last_micro:
                undo_d = self.step_discriminator_first()
            logs |= self.generator_step(unroll, targets, c, g_dev, last_micro)
        else:
            logs = self.generator_step(unroll, targets, c, g_dev, last_micro)
            logs |= self.discriminator_step(unroll, hr, c, g_dev, last_micro)
        self.micro_step += 1
        if last_micro:
            self.allreduced_bytes = self.synced.count.take()
        stepped = last_micro and self.optimizer_steps(undo_d)
        if stepped:
            self.after_iteration()
        elif last_micro:
            self.iteration += 1  # skipped: only the counters move
        if self.method["ema_every"] == "micro_step" and stepped:
            # after this micro-step's optimizer steps, as the official loop (the iteration's earlier
            # micro-steps' updates were made by `ema_catch_up`, once the iteration was known to step)
            self.ema.update()
        self.log_iteration(logs, unroll.k, hr.shape[0])

    def log_iteration(self, logs: dict, k: int, batch_size: int) -> None:
        """The iteration's values to the loggers and the progress bar, given at the logging steps only:
        a value given at another step is never written, yet giving it costs a wait for the device's queue
        (a host number is copied to the device; a progress-bar value is read on the host at once)."""
        if not logging_step(self.trainer):
            return
        self.log("train/nonfinite_skipped", float(self.nonfinite.skipped), batch_size=batch_size)
        logs["unroll_k"] = torch.tensor(float(k))
        graded_steps = [name for name in logs if name.startswith("loss_dis_step")]
        log_where_computed(self, {f"train/{name}": logs.pop(name) for name in graded_steps})
        self.log_dict(
            {f"train/{name}": v.detach().float() for name, v in logs.items()},
            prog_bar=False,
            batch_size=batch_size,
        )
        self.log("train/iteration", self.iteration.float(), batch_size=batch_size)
        if self.synced.wrappers:
            self.log("train/allreduce_mib", self.allreduced_bytes / 2**20, batch_size=batch_size)
        # the progress bar's short names; the logger has them under train/
        bar = {name: logs[name].detach().float() for name in ("loss_g", "loss_d") if name in logs}
        self.log_dict(bar, prog_bar=True, logger=False, batch_size=batch_size)

    def wrap_for_ddp(self, **ddp_kwargs) -> None:
        """`PartsDDPStrategy`: the student and the discriminator each in their own DDP wrapper, so the
        generator's backward reduces the student's gradients and the discriminator's its heads', every
        trained weight getting a gradient in its backward (no unused-parameter search). Buffers are not
        broadcast at each forward: every rank computes the same ones (the DDP wrappers sync them once)."""
        ddp_kwargs = {"broadcast_buffers": False, **ddp_kwargs}
        for part in (self.student, self.discriminator):
            self.synced.wrap(part, **ddp_kwargs)

    def step_discriminator_first(self):
        """`gd_order: discriminator_first`: step D before the student's forward, and return how to undo
        that step (weights and optimizer state) should the student's loss turn out non-finite, so that a
        skipped iteration still moves nothing. None when D's own gradients are non-finite (not stepped)."""
        _, opt_d = self.optimizers()
        student = [p for _, p in self.student_trainable()]
        discriminator = [p for _, p in self.discriminator_trainable()]
        if not self.nonfinite.check_grads("grad_d", [p.grad for p in discriminator], self):
            for p in discriminator:
                p.grad = None
            step_alone(opt_d, student)  # moves nothing but the step counter; the guard skips the iteration
            return None
        weights = [p.detach().clone() for p in discriminator]
        state = copy.deepcopy(opt_d.optimizer.state_dict())
        step_alone(opt_d, student)

        def undo() -> None:
            with torch.no_grad():
                for p, w in zip(discriminator, weights):
                    p.copy_(w)
            opt_d.optimizer.load_state_dict(state)

        return undo

    def optimizer_steps(self, undo_d=None) -> bool:
        """Both optimizer steps of the iteration, or neither when a loss or gradient is non-finite.

        With `undo_d` the discriminator has already stepped (`gd_order: discriminator_first`): only the
        student steps here, and a skipped iteration undoes the discriminator's step.
        """
        opt_g, opt_d = self.optimizers()
        student = [p for _, p in self.student_trainable()]
        discriminator = [p for _, p in self.discriminator_trainable()]
        d_stepped = self.method["gd_order"] == "discriminator_first"
        grads = {"g": [p.grad for p in student]} | (
            {} if d_stepped else {"d": [p.grad for p in discriminator]}
        )
        ok = self.nonfinite.finish(self, grads)
        if ok:
            self.ema_catch_up()
        # skipped: the gradients are dropped, so the steps move nothing but the step counters
        if not d_stepped:
            step_apart(opt_g, student, opt_d, discriminator)
            return ok
        if not ok and undo_d is not None:
            undo_d()
        step_alone(opt_g, discriminator)
        return ok

    def ema_catch_up(self) -> None:
        """`ema_every: micro_step`: the EMA updates of the iteration's micro-steps before the last, made
        once the iteration is known to step (a skipped iteration moves no EMA) and before the student's
        step (those micro-steps saw the weights from before it)."""
        if self.method["ema_every"] == "micro_step":
            for _ in range(self.method["accumulate_grad_batches"] - 1):
                self.ema.update()

    def after_iteration(self) -> None:
        self.iteration += 1
        if self.method["ema_every"] == "iteration":
            self.ema.update()
        for scheduler in self.lr_schedulers() or []:
            scheduler.step()

    # ----------------------------------------------------------------- validation: the inference sampler
    def student_pipeline(self, scale: int) -> AddSRPipeline:
        """The in-memory student as an upscaler, with the inference settings of `method`."""
        m = self.method
        return AddSRPipeline(
            self.student,
            self.codec,
            self.conditioner,
            self.noise_schedule,
            self.student_timesteps.tolist(),
            m["psr"],
            m["inference_psr_weight"],
            scale,
        )

    def on_validation_epoch_start(self) -> None:
        self._ema_context = self.ema.swapped_in()
        self._ema_context.__enter__()

    def on_validation_epoch_end(self) -> None:
        self._ema_context.__exit__(None, None, None)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """PSNR of the EMA student at each configured step count; an image grid of the first batch."""
        hr, lr = batch["hr"], batch["lr"]
        pipeline = self.student_pipeline(hr.shape[-1] // lr.shape[-1])
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, batch_idx))
        steps = pipeline.run(lr, generator=generator)
        for k, step in enumerate(steps, start=1):
            if k not in self.method["val_steps"]:
                continue
            image = (
                step.x0_image if step.x0_image is not None else self.codec.decode(step.x0_latent).clamp(0, 1)
            )
            mse = (image.float() - hr.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            self.log(
                f"val/psnr_{k}step", (-10 * torch.log10(mse)).mean(), batch_size=hr.shape[0], sync_dist=True
            )
        if batch_idx == 0:
            self.log_image_grid(lr, steps, hr)

    def log_image_grid(self, lr: Tensor, steps: list[StudentStep], hr: Tensor) -> None:
        """Rows of LR | step 1 ... step k | HR, saved under the run's samples/ and sent to the logger."""
        from addsr_pl.logging import save_image_grid

        images = [upscale(lr, hr.shape[-2:])]
        images += [
            s.x0_image if s.x0_image is not None else self.codec.decode(s.x0_latent).clamp(0, 1)
            for s in steps
        ]
        save_image_grid(self, [*images, hr], f"val/grid_iter{int(self.iteration):06d}")

    # ----------------------------------------------------------------- gradients
    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients are unscaled here under 16-mixed, so clipping and norms are in true units."""
        opt_g, opt_d = self.optimizers(use_pl_optimizer=False)
        which, params, clip = (
            ("g", [p for _, p in self.student_trainable()], self.method["grad_clip_g"])
            if optimizer is opt_g
            else ("d", [p for _, p in self.discriminator_trainable()], self.method["grad_clip_d"])
        )
        grads = [p for p in params if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.clip_grad_norm_(grads, clip) if clip else None
        if not logging_step(self.trainer):
            return  # see `log_iteration`
        if norm is None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in grads])))
        self.log(f"train/grad_norm_{which}", norm.float())
        self.log(f"train/lr_{which}", optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        m = self.method
        fused = m["memory"]["fused_adamw"]
        # _convert_="all": plain lists in the optimizer state (ZeRO keeps its kwargs as given, and an
        # omegaconf ListConfig there would make the checkpoint unreadable to a weights-only load)
        opt_g = instantiate(
            m["optimizer_g"],
            params=[p for _, p in self.student_trainable()],
            **optimizer_options(m["optimizer_g"]["_target_"], fused, self.device),
            _convert_="all",
        )
        opt_d = instantiate(
            m["optimizer_d"],
            params=[p for _, p in self.discriminator_trainable()],
            **optimizer_options(m["optimizer_d"]["_target_"], fused, self.device),
            _convert_="all",
        )
        schedulers = [
            instantiate(m["lr_scheduler"], optimizer=opt, _convert_="all") for opt in (opt_g, opt_d)
        ]
        return [opt_g, opt_d], [{"scheduler": s, "interval": "step"} for s in schedulers]

    # ----------------------------------------------------------------- checkpoints
    def trained_state_keys(self) -> set[str]:
        """What a checkpoint holds: trained student weights, EMA, discriminator heads, the iteration."""
        keys = {f"student.{n}" for n, _ in self.student_trainable()}
        keys |= {f"ema.{k}" for k in self.ema.state_dict()}
        keys |= {f"discriminator.{k}" for k in self.discriminator.trainable_state_keys()}
        return keys | {"iteration"}
