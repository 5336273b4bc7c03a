"""Hugging Face: (A)SAM under ``transformers.Trainer`` and ``accelerate`` (optional: ``pip install fastasam[hf]``).

``transformers.Trainer`` runs one forward/backward per batch and then calls ``optimizer.step()`` once.
:class:`SAMTrainer` makes its training step the two passes: the first forward/backward at w, ``first_step``
(w <- w + e), the second forward/backward at w + e (BatchNorm statistics frozen), and the Trainer's own gradient
clipping, ``optimizer.step()`` (which after ``first_step`` is ``second_step``: restore w, then the base optimizer's
update), scheduler and ``zero_grad`` as usual. Give it a fastasam optimizer either way the Trainer takes one::

    trainer = SAMTrainer(model=model, args=args, train_dataset=ds,
                         optimizer_cls_and_kwargs=(fastasam.ASAM, dict(base_optimizer=torch.optim.AdamW, rho=0.5,
                                                                       lr=5e-5)))
    # or: optimizers=(fastasam.ASAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=5e-5), None)
    trainer.train()

(with ``optimizer_cls_and_kwargs`` the Trainer builds its usual two param groups, with and without weight decay, and
fastasam passes them to the base optimizer.) Gradient clipping (``max_grad_norm``) applies to the second pass's
gradient, the one the base optimizer steps with. ``gradient_accumulation_steps`` must be 1: SAM's perturbation needs
the whole batch's gradient before the second pass, which the Trainer's accumulation loop does not give (use a larger
``per_device_train_batch_size`` instead). bf16 (``bf16=True``) runs under autocast and needs nothing more; fp16 with
its gradient scaler goes through ``GradScaler.step(optimizer)``, which fastasam supports, but is untested here (no GPU).

``fastasam.MSAM`` (Momentum-SAM, one forward/backward a step) needs no second pass: :class:`SAMTrainer` lets the
Trainer's own training step run, and evaluates and predicts at its unperturbed weights (``MSAM.unperturbed()``);
``gradient_accumulation_steps`` may then be anything. Its checkpoints keep the weights as they are between steps,
with the optimizer's state: a resume continues the same trajectory. ``fastasam.BSAM`` takes the two passes as ASAM
does and is evaluated and predicted at its mean; FriendlySAM and WSAM are ASAM's subclasses.

With ``accelerate`` directly, prepare the fastasam optimizer like any other and use :func:`unwrap` for the first
step; ``optimizer.step()`` after it is the second step::

    model, opt, loader = accelerator.prepare(model, fastasam.ASAM(model.parameters(), torch.optim.SGD, ...), loader)
    for x, y in loader:
        accelerator.backward(loss_fn(model(x), y))
        unwrap(opt).first_step(zero_grad=True)
        with fastasam.frozen_batchnorm_stats(model):
            accelerator.backward(loss_fn(model(x), y))
        opt.step()
        opt.zero_grad()
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from transformers import Trainer

from .optim import ASAM
from .utils import frozen_batchnorm_stats, unwrap_optimizer
from .variants import BSAM, MSAM


def unwrap(optimizer: Any) -> ASAM | MSAM | BSAM:
    """The fastasam optimizer inside ``optimizer`` (accelerate's ``AcceleratedOptimizer`` keeps it in
    ``.optimizer``). Raises ``TypeError`` naming the fix when there is none."""
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, ASAM | MSAM | BSAM):
        raise TypeError(f"fastasam: {type(optimizer).__name__} is not (and does not wrap) a fastasam optimizer; give "
                        "the Trainer one: optimizers=(fastasam.ASAM(...), None) or optimizer_cls_and_kwargs="
                        "(fastasam.ASAM, {...})")
    return opt


class SAMTrainer(Trainer):
    """``transformers.Trainer`` with (A)SAM's two passes in each training step (see the module docstring)."""

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        if isinstance(unwrap(self.optimizer), MSAM):  # one pass a step: the Trainer's own
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"fastasam: SAMTrainer needs gradient_accumulation_steps=1 (got "
                f"{self.args.gradient_accumulation_steps}): the perturbation needs the whole batch's gradient before "
                "the second pass. Use a larger per_device_train_batch_size instead.")
        opt = unwrap(self.optimizer)
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward + backward at w
        if not opt.second_pass_needed:  # every > 1: this step is the base optimizer's alone
            return loss
        opt.first_step(zero_grad=True)  # w <- w + e
        with frozen_batchnorm_stats(model):
            super().training_step(model, inputs, num_items_in_batch)  # forward + backward at w + e
        return loss  # the loss at w, as the Trainer logs for plain optimizers; its optimizer.step() is second_step

    def _unperturbed(self):
        opt = unwrap_optimizer(self.optimizer) if self.optimizer is not None else None
        return opt.unperturbed() if isinstance(opt, MSAM | BSAM) else nullcontext()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate`` at the unperturbed weights of an ``MSAM`` optimizer and at the mean of a ``BSAM`` one
        (as it is for the others)."""
        with self._unperturbed():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict`` at the unperturbed weights of an ``MSAM`` optimizer, the mean of a ``BSAM`` one."""
        with self._unperturbed():
            return super().predict(*args, **kwargs)
