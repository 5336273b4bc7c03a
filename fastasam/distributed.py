"""Helpers for ``torch.distributed`` training.

DDP, global mode (the default; nothing to do): DDP averages the gradients of both backward passes over the ranks,
so every rank computes the same global norm and the same perturbation, and training equals one process on the global
batch.

DDP, per-replica ("m-sharpness", SAM paper §4): each rank perturbs with the norm of its own gradient, so the first
backward must not be all-reduced, and its gradients must be gone before the second, synchronised backward (DDP would
otherwise all-reduce their sum). :func:`replica_perturbation` does both::

    with fastasam.distributed.replica_perturbation(ddp_model, opt):
        loss_fn(ddp_model(x), y).backward()          # local gradients only
    # on exit: opt.first_step(zero_grad=True), with this rank's own norm
    loss_fn(ddp_model(x), y).backward()              # all-reduced as usual
    opt.second_step(zero_grad=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def replica_perturbation(model: Any, optimizer: Any) -> Iterator[None]:
    """Run the block (the first forward and backward) under ``model.no_sync()``, then perturb with this rank's own
    gradient norm and zero the gradients. ``model`` is a ``DistributedDataParallel`` module (anything with
    ``no_sync``); ``optimizer`` a ``fastasam.ASAM``/``SAM``."""
    no_sync = getattr(model, "no_sync", None)
    if no_sync is None:
        raise TypeError(
            f"fastasam: replica_perturbation needs a DistributedDataParallel model (with no_sync()), got "
            f"{type(model).__name__}. Wrap the model in DDP, or use plain first_step() for global mode."
        )
    if not hasattr(optimizer, "first_step"):
        raise TypeError(f"fastasam: replica_perturbation needs a fastasam.ASAM or SAM optimizer, got "
                        f"{type(optimizer).__name__}.")
    with no_sync():
        yield
    optimizer.first_step(zero_grad=True)
