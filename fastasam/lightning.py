"""PyTorch Lightning helpers for ``fastasam.ASAM``/``fastasam.SAM`` (``pip install "fastasam[lightning]"``).

Nothing here imports Lightning: the helpers use the LightningModule they are given, so ``fastasam`` keeps torch as
its only requirement and importing this module costs nothing.

* Automatic optimisation works as is: Lightning calls ``optimizer.step(closure)`` and ``ASAM.step`` runs that closure
  (``training_step``, ``zero_grad``, ``backward``) twice, at ``w`` and at ``w + e``. :func:`is_second_pass` tells the
  two calls apart, :func:`second_pass_frozen_batchnorm` keeps BatchNorm running statistics to the first.
* Manual optimisation: :func:`manual_step` runs both passes through ``self.optimizers().step(...)``, so Lightning counts
  the step (``trainer.global_step``) and an fp16 ``GradScaler`` precision plugin does the descent.
* ``fastasam.MSAM`` (Momentum-SAM, one forward/backward a step) needs no second pass: automatic optimisation runs it
  as any optimizer. Its weights sit at the perturbed point between steps; :func:`unperturbed_evaluation` is a
  callback that validates, tests and predicts at the unperturbed weights (``MSAM.unperturbed()``).
* ``fastasam.BSAM`` (Bayesian SAM, an optimizer of its own) runs under automatic optimisation as ASAM does (its
  ``step(closure)`` runs the closure at the noisy point and at the ascent); its weights hold ``w + noise`` between
  steps, and :func:`unperturbed_evaluation` evaluates at the mean ``w``. FriendlySAM and WSAM are ASAM's subclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from .optim import ASAM
from .utils import frozen_batchnorm_stats, unwrap_optimizer

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

__all__ = ["is_second_pass", "manual_step", "second_pass_frozen_batchnorm", "sharpness_optimizer",
           "unperturbed_evaluation"]


def sharpness_optimizer(module: LightningModule, optimizer: Any = None) -> ASAM:
    """The ``ASAM``/``SAM`` behind ``optimizer`` (default: the module's only optimizer), unwrapped from Lightning's
    ``LightningOptimizer``: its ``perturbed`` flag and ``first_step`` live on the real optimizer."""
    opt = module.optimizers() if optimizer is None else optimizer
    if isinstance(opt, (list, tuple)):
        raise ValueError("fastasam: this LightningModule has several optimizers; pass the ASAM/SAM one as optimizer=")
    opt = unwrap_optimizer(opt)  # LightningOptimizer (lightning.pytorch or pytorch_lightning) wraps it
    if not isinstance(opt, ASAM):
        raise TypeError(f"fastasam: expected a fastasam.ASAM or fastasam.SAM optimizer, got {type(opt).__name__}")
    return opt


def is_second_pass(module: LightningModule, optimizer: Any = None) -> bool:
    """True while the optimizer holds ``w + e``: inside ``training_step`` (or a closure) this is the second pass of
    the step. Use it to log only the first pass's loss, since ``training_step`` runs twice per step."""
    return sharpness_optimizer(module, optimizer).perturbed


@contextmanager
def second_pass_frozen_batchnorm(module: LightningModule, optimizer: Any = None) -> Iterator[None]:
    """``fastasam.frozen_batchnorm_stats(module)`` during the second pass, nothing during the first: BatchNorm running
    statistics then move once per step, from the unperturbed weights, as in the plain two-pass loop."""
    with frozen_batchnorm_stats(module) if is_second_pass(module, optimizer) else nullcontext():
        yield


def manual_step(
    module: LightningModule,
    compute_loss: Callable[[], torch.Tensor],
    optimizer: Any = None,
    *,
    freeze_batchnorm: bool = True,
) -> torch.Tensor:
    """One ASAM/SAM step under manual optimisation (``self.automatic_optimization = False``); returns the first
    pass's loss, detached.

    ``compute_loss()`` runs the forward pass and returns the loss; it is called twice, at ``w`` and at ``w + e``, each
    followed by ``module.manual_backward``. BatchNorm running statistics move on the first pass only (unless
    ``freeze_batchnorm=False``). The step goes through the ``LightningOptimizer``'s ``step``, so Lightning counts it
    in ``trainer.global_step`` (``max_steps``, step-based logging and checkpointing) and the precision plugin runs it:

    * no loss scaler (32-bit, bf16-mixed): ``ASAM.step`` calls the one-pass closure twice around the ascent;
    * fp16 ``GradScaler`` (16-mixed): Lightning runs the closure once, then ``scaler.step(optimizer)``; so the
      closure runs both passes and the ascent, and ``scaler.step`` restores ``w`` and does the (unscaled) descent.

    Step LR schedulers yourself (``self.lr_schedulers().step()``) after it, as manual optimisation requires.
    """
    lightning_opt = module.optimizers() if optimizer is None else optimizer
    sam = sharpness_optimizer(module, lightning_opt)
    losses: list[torch.Tensor] = []

    def one_pass() -> torch.Tensor:
        with frozen_batchnorm_stats(module) if freeze_batchnorm and sam.perturbed else nullcontext():
            loss = compute_loss()
        module.manual_backward(loss)
        losses.append(loss.detach())
        return loss

    def both_passes() -> torch.Tensor:
        loss = one_pass()
        if not sam.second_pass_needed:  # every > 1: the base optimizer's step alone
            return loss
        sam.first_step(zero_grad=True)
        one_pass()
        return loss

    sam.zero_grad()
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    lightning_opt.step(closure=one_pass if scaler is None else both_passes)
    return losses[0]


def unperturbed_evaluation() -> Any:
    """A Lightning ``Callback`` that runs the validation, test and predict loops at the unperturbed weights of the
    module's ``fastasam.MSAM`` optimizers and at the mean of its ``fastasam.BSAM`` ones (their ``unperturbed()``;
    nothing for other optimizers). Lightning is imported
    here, when the callback is made: ``Trainer(callbacks=[fastasam.lightning.unperturbed_evaluation()])``."""
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the older package name
        from pytorch_lightning import Callback

    from .variants import BSAM, MSAM

    class UnperturbedEvaluation(Callback):
        def __init__(self) -> None:
            self._inside: list = []

        def _enter(self, trainer) -> None:
            for opt in trainer.optimizers:
                opt = unwrap_optimizer(opt)
                if isinstance(opt, MSAM | BSAM):
                    ctx = opt.unperturbed()
                    ctx.__enter__()
                    self._inside.append(ctx)

        def _exit(self, *_: Any) -> None:
            while self._inside:
                self._inside.pop().__exit__(None, None, None)

        def on_validation_start(self, trainer, pl_module) -> None:
            self._enter(trainer)

        def on_validation_end(self, trainer, pl_module) -> None:
            self._exit()

        def on_test_start(self, trainer, pl_module) -> None:
            self._enter(trainer)

        def on_test_end(self, trainer, pl_module) -> None:
            self._exit()

        def on_predict_start(self, trainer, pl_module) -> None:
            self._enter(trainer)

        def on_predict_end(self, trainer, pl_module) -> None:
            self._exit()

    return UnperturbedEvaluation()
