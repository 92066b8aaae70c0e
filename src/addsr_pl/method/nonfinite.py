"""Non-finite safety of an iteration: a NaN/inf loss or gradient skips both optimizer steps.

An AddSR iteration computes the student's and the discriminator's losses and gradients, then
`NonFiniteGuard.finish` decides on all ranks together (one all-reduce) whether to step: when any
loss or gradient of the iteration is non-finite on any rank, both optimizers step with their
gradients dropped, so no weight, EMA or optimizer state moves, while the step counters (and the
data position) advance as for any iteration. `method.max_consecutive_nonfinite` such iterations in a
row stop the run with `NonFiniteLossError`.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive iterations had a non-finite loss or gradient."""


def flags_true(module) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=module.device)


def assert_finite_weights(named_tensors, what: str) -> None:
    """Refuse to go on with weights holding NaN or inf, naming up to five of them."""
    bad = [name for name, t in named_tensors if not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteLossError(
            f"{what} holds non-finite values in {len(bad)} tensors, e.g. {bad[:5]}. Nothing was written; "
            "resume from an earlier checkpoint (ckpt_path=<run dir>/checkpoints/step<N>.ckpt), "
            "e.g. with lower learning rates."
        )


class NonFiniteGuard:
    """Tracks the non-finite losses of the current iteration and the skip counters.

    `check_loss` is called with each loss (before its backward), `finish` once the iteration's
    gradients are complete; `state_dict` goes into checkpoints so the counts survive a resume.
    """

    def __init__(self, max_consecutive: int, inject_at_iteration: int | None = None):
        if max_consecutive < 1:
            raise ValueError(f"method.max_consecutive_nonfinite must be at least 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.inject_at_iteration = inject_at_iteration
        self.skipped = 0
        self.consecutive = 0
        self._losses: list[tuple[str, Tensor]] = []

    def inject(self, loss: Tensor, module) -> Tensor:
        """`fault.nan_loss_at_iteration`: the loss becomes NaN at that (1-based) iteration on rank 0."""
        if self.inject_at_iteration is None or module.global_rank != 0:
            return loss
        return loss * math.nan if int(module.iteration) + 1 == self.inject_at_iteration else loss

    def check_loss(self, name: str, loss: Tensor) -> None:
        """Note a loss of this iteration; it is read (one host sync for all) in `finish`."""
        self._losses.append((name, torch.isfinite(loss.detach()).all()))

    def check_grads(self, name: str, grads: list[Tensor | None], module) -> bool:
        """Whether `grads` are finite on every rank (one host sync); the result also counts in `finish`."""
        finite = torch.stack(
            [torch.isfinite(g).all() for g in grads if g is not None] or [flags_true(module)]
        ).all()
        self._losses.append((name, finite))
        flag = (~finite).float()
        if module._trainer is not None:
            flag = module.trainer.strategy.reduce(flag, reduce_op="sum")
        return int(flag) == 0

    def finish(self, module, grads: dict[str, list[Tensor]]) -> bool:
        """True when the iteration may step; on False the gradients are already dropped.

        `grads` maps each phase ("g", "d") to its gradients. Every rank calls this once per
        iteration: the decision is all-reduced, so all ranks skip together. Reading the decision is the
        iteration's one wait for the device; the iteration's number is read only to report a skip.
        """
        names = [name for name, _ in self._losses]
        names += [f"grad_{phase}" for phase in grads]
        flags = [flag for _, flag in self._losses]
        flags += [
            torch.stack([torch.isfinite(g).all() for g in gs if g is not None] or [flags_true(module)]).all()
            for gs in grads.values()
        ]
        self._losses.clear()
        finite = torch.stack(flags)
        flag = (~finite).any().float()
        if module._trainer is not None:
            flag = module.trainer.strategy.reduce(flag, reduce_op="sum")
        ranks_bad = int(flag)  # the iteration's one host sync
        if ranks_bad == 0:
            self.consecutive = 0
            return True
        bad = [name for name, ok in zip(names, finite.tolist()) if not ok]
        iteration = int(module.iteration) + 1
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "Iteration %d: non-finite %s on rank %d (%d rank(s) affected); both optimizer steps skipped "
            "(%d skipped so far, %d in a row).",
            iteration,
            ", ".join(bad) or "values on another rank",
            module.global_rank,
            ranks_bad,
            self.skipped,
            self.consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive iterations (up to iteration {iteration}) had a non-finite "
                f"loss or gradient (last: {', '.join(bad) or 'on another rank'}); the run stops. Resume from "
                "a checkpoint before the divergence with lower learning rates, or raise "
                "method.max_consecutive_nonfinite."
            )
        for optimizer in module.optimizers(use_pl_optimizer=False):
            optimizer.zero_grad(set_to_none=True)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


def step_alone(optimizer, hidden_params) -> None:
    """Step `optimizer` and clear its gradients while the gradients of `hidden_params` are set aside."""
    stash = [p.grad for p in hidden_params]
    for p in hidden_params:
        p.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p, grad in zip(hidden_params, stash):
        p.grad = grad


def step_apart(first, first_params, second, second_params) -> None:
    """Step `first` then `second`, each while the other's gradients are set aside, and clear both."""
    step_alone(first, second_params)
    step_alone(second, first_params)
