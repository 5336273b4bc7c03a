"""Training-loop helpers around the two passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Run the second pass without touching BatchNorm running statistics.

    Inside the block every BatchNorm (including SyncBatchNorm) that tracks running statistics normalises with the batch
    statistics, as in the first pass, but updates neither ``running_mean``/``running_var`` nor
    ``num_batches_tracked``. This is right for ``momentum=None`` (cumulative average) too, where zeroing ``momentum``
    (the usual trick) would still count the batch. Flags are restored on exit, also after an exception.

        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        with fastasam.frozen_batchnorm_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """
    frozen = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that training frameworks' wrappers hold: accelerate's ``AcceleratedOptimizer`` (``.optimizer``),
    Lightning's ``LightningOptimizer`` (``._optimizer``), nested up to a few levels; ``optimizer`` itself when it wraps
    nothing. (A fastasam optimizer's own ``base_optimizer`` is not a wrapper and is not followed.)"""
    from .optim import ASAM

    opt = optimizer
    for _ in range(8):
        if isinstance(opt, ASAM):
            return opt
        inner = opt.__dict__.get("_optimizer", getattr(opt, "optimizer", None))
        if inner is None or isinstance(inner, type):
            return opt
        opt = inner
    return opt
