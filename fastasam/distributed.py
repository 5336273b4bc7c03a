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

Teardown with gloo: end the run with :func:`destroy_process_group` on every rank, in place of
``torch.distributed.destroy_process_group`` (see there for the hang it avoids).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

# The barrier works of the last destroy_process_group() call, held until the next call (or the interpreter's exit)
_KEPT: list = []


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


def destroy_process_group(group: Any = None) -> None:
    """``torch.distributed.destroy_process_group(group)`` without PyTorch's gloo teardown hang. Call it on every rank
    of the groups it destroys (it runs a barrier on each gloo group), after the last backward pass, where the run
    would call torch's; it destroys the same groups (``group``, or all of them for ``None``).

    The hang (PyTorch's, with any optimizer): every collective that DDP launches during a backward pass keeps a copy
    of the thread-local state, and with it a Python object (the ``contextvars.Context`` that ``torch.autograd``
    stores there for the pass). The gloo worker thread that ran the collective frees it afterwards, and freeing that
    object takes the GIL. The process group is destroyed by whoever drops its last reference, usually the DDP
    ``Reducer`` when the model is freed, always with the GIL held, and its destructor waits for the worker threads.
    If a worker has not freed its last collective by then, each thread waits for the other for ever. It is a matter
    of timing: the sooner the process group goes after the last backward pass, the likelier (a fast optimizer step
    shortens that time).

    Here a barrier is run on each gloo group and kept: gloo's barrier holds weak references to the collectives not
    yet finished when it was issued, so they are freed with the barrier, by the thread that frees it (this one, at
    the next call or at the interpreter's exit), and never by a worker that the destructor waits for."""
    groups = _gloo_groups(group)
    works = [w for w in (dist.barrier(group=g, async_op=True) for g in groups) if w is not None]
    for work in works:
        work.wait()
    _KEPT[:] = works  # frees the previous call's barriers: their groups were destroyed then
    dist.destroy_process_group(group)


def _gloo_groups(group: Any) -> list:
    """Of ``group`` (``None``: every process group of this rank, in creation order), those that run on gloo."""
    if group is None:
        world = getattr(dist.distributed_c10d, "_world", None)
        groups = list(getattr(world, "pg_map", None) or ())
    else:
        groups = [group]
    return [g for g in groups if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER
            and "gloo" in str(dist.get_backend(g))]
