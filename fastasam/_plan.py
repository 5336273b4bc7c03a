"""What a step works on: the parameters that have a gradient, bucketed by (device, dtype), validated once.

:func:`build_buckets` is run when the step plan is built (``_engine``), not every step. Every backend receives
:class:`Bucket` objects, so the optimizer classes, the reference oracle and the fast paths agree on one description
of the job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

RESTORE_MODES = ("copy", "subtract")


@dataclass
class Bucket:
    """All tensors of one (device, dtype) that take part in one step, perturbed ones first.

    Static (set when the plan is built): ``params[i]`` (a parameter, or the local shard of the DTensor parameter
    ``keys[i]``), ``adaptive[i]``, ``eta[i]``, ``rho[i]`` and ``group[i]`` (the index of its param group).
    ``params[:n_perturbed]`` have ``rho > 0`` and are perturbed; the others only count in the norm. ``buffers[i]``
    (perturbed tensors only) is the one parameter-sized buffer kept for the restore: the original weight
    (``restore="copy"``) or the perturbation ``e`` (``restore="subtract"``), in the storage dtype.

    Per step (set by the step plan before a backend reads them): ``grads[i]``; for the perturbation ``scales[i]``, a 0-d
    tensor on ``device`` holding ``rho / (norm + eps)`` (0 when the norm is not finite or is 0), and ``finite``.
    """

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    adaptive: list[bool] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)
    group: list[int] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    finite: torch.Tensor | None = None  # 0-d bool on device: the global norm is finite
    n_perturbed: int = 0
    layout: object = None  # a backend's precomputed description of these tensors (foreach: runs and chunks)
    # process groups over which the squared norm share is summed (the Shard dims of the DTensors' mesh); empty when
    # the tensors are whole (or replicated) on every rank
    reduce_over: tuple = ()

    @property
    def dtensor_shards(self) -> bool:
        """The tensors are local shards of DTensor parameters (the optimizer's state is keyed by ``keys``)."""
        return any(k is not p for k, p in zip(self.keys, self.params))

    def head(self, n: int) -> Bucket:
        """The first ``n`` tensors (the perturbed ones, for ``n = n_perturbed``) as a bucket of their own."""
        out = replace(self)
        for name in ("params", "grads", "adaptive", "eta", "rho", "group", "keys", "buffers", "scales"):
            setattr(out, name, getattr(self, name)[:n])
        out.n_perturbed = min(n, self.n_perturbed)
        out.layout = None
        return out

    def subset(self, keep: list[bool]) -> Bucket:
        """The tensors where ``keep`` is true, in order (shares tensors, not lists)."""
        out = replace(self)
        for name in ("params", "grads", "adaptive", "eta", "rho", "group", "keys", "buffers", "scales"):
            src = getattr(self, name)
            setattr(out, name, [x for x, k in zip(src, keep) if k] if src else [])
        out.n_perturbed = sum(keep[: self.n_perturbed])
        out.layout = None
        return out


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32 for fp32/fp16/bf16 storage, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_not_capturing(devices: Iterable[torch.device], what: str) -> None:
    """Raise a clear error when ``what`` (a plan's tables: allocations and copies from host memory) would be built
    while a CUDA graph is being captured on the current stream, where those operations are illegal."""
    if any(d.type == "cuda" for d in devices) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fastasam: {what} would be built during CUDA-graph capture, which cannot allocate or copy from host "
            "memory. A step plan is built on the first step and again after the parameters, their gradients' "
            "layout or the options change (gradients at new addresses rewrite its tables). Warm up first: run a few "
            "eager steps (first_step and second_step, with the parameters, gradients and options the graph will "
            "see) on a side stream before capturing, and zero the gradients with zero_grad(set_to_none=False), in the "
            "warm-up and in the captured step: the gradients must keep their addresses across a captured step, and "
            "set_to_none=True frees them, so that the next backward makes new ones elsewhere."
        )


def param_name(group: Mapping, gi: int, pi: int) -> str:
    """How an error message names a parameter: its ``param_names`` entry where the group has one."""
    names = group.get("param_names")
    return names[pi] if names else f"param_groups[{gi}]['params'][{pi}]"


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local(p: torch.Tensor, g: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """A DTensor parameter (FSDP2 ``fully_shard``, tensor parallel) as its local shard and the process groups its
    squared-norm share must be summed over: one per mesh dim the parameter is sharded on (replicated dims hold equal
    copies, so summing over them would count the shard twice)."""
    if not is_dtensor(g) or tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        got = tuple(g.placements) if is_dtensor(g) else "a plain tensor"
        raise RuntimeError(
            f"fastasam: {name} is a DTensor with placements {tuple(p.placements)} but its gradient is {got}; they "
            "must match (a Partial gradient has not been reduced yet). Call first_step() after backward() has "
            "finished, with FSDP2 or DTensor-aware data parallelism doing the reduction."
        )
    for placement in p.placements:
        if not (placement.is_shard() or placement.is_replicate()):
            raise RuntimeError(f"fastasam: {name} has placement {placement}; only Shard and Replicate are supported.")
    return p.to_local(), g.to_local(), shard_groups(p)


def shard_groups(p: torch.Tensor) -> tuple:
    """The process groups over which a DTensor parameter's local sums add up to the global one (its Shard mesh dims;
    replicated dims hold copies); () for a plain tensor."""
    if not is_dtensor(p):
        return ()
    return tuple(p.device_mesh.get_group(d) for d, placement in enumerate(p.placements) if placement.is_shard())


def sum_over(t: torch.Tensor, groups: tuple) -> torch.Tensor:
    """``t``, summed in place over each process group of ``groups`` (``shard_groups``; on the device)."""
    if groups:
        import torch.distributed as dist

        for pg in groups:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
    return t


def indices_by_key(keys: list) -> dict:
    """key -> the indices that have it, in first-seen order (the same on every rank for the same keys)."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def local_gradient(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The local shard of DTensor ``p``'s gradient ``g`` (their placements must still match)."""
    return _local(p, g, "a DTensor parameter")[1]


def check_gradient(p: torch.Tensor, g: torch.Tensor, name: str) -> None:
    """Raise unless ``g`` is a dense gradient of ``p``'s shape, dtype and device and ``p`` is floating point."""
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(
            f"fastasam: {name} has a sparse gradient; ASAM/SAM need dense gradients. "
            "Use dense embeddings (sparse=False) or leave this parameter out of the optimizer."
        )
    if not p.is_floating_point():
        raise TypeError(f"fastasam: {name} has dtype {p.dtype}; only floating-point parameters are supported.")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(
            f"fastasam: {name} has a gradient of shape {tuple(g.shape)}, {g.dtype} on {g.device} but the parameter "
            f"is {tuple(p.shape)}, {p.dtype} on {p.device}; they must match."
        )


def check_no_shared_memory(buckets: list[Bucket], groups: list[Mapping]) -> None:
    """Raise a ``ValueError`` naming two parameters when their memory overlaps (views of one storage that share
    elements, or whose elements interleave): perturbing one would move the other's weights too, and the restore of
    one would undo part of the other's. One sweep over the tensors sorted by address (the plan's build only)."""
    spans = []
    for b in buckets:
        for k, p in zip(b.keys, b.params, strict=True):
            if p.numel() and p.device.type != "meta":
                start = p.data_ptr()
                last = sum((n - 1) * st for n, st in zip(p.shape, p.stride()))
                spans.append((p.device.type, p.device.index or 0, start, start + (last + 1) * p.element_size(), k))
    spans.sort(key=lambda s: s[:3])
    reach = None  # (device, end, key) of the span that reaches furthest so far
    for dev_type, dev_index, start, end, key in spans:
        if reach is not None and reach[0] == (dev_type, dev_index) and start < reach[1]:
            names = {id(p): param_name(g, gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}
            raise ValueError(
                f"fastasam: parameters {names.get(id(reach[2]), 'a parameter')} and {names.get(id(key), 'another')} "
                "share memory (views of one storage whose elements overlap or interleave); perturbing one would move "
                "the other, and restoring one would undo part of the other. Give each parameter its own memory "
                "(p.data = p.data.clone()), or, for tied weights, pass the shared parameter once."
            )
        if reach is None or reach[0] != (dev_type, dev_index) or end > reach[1]:
            reach = ((dev_type, dev_index), end, key)


def build_buckets(groups: Iterable[Mapping]) -> tuple[list[Bucket], list[torch.Tensor]]:
    """Bucket every parameter of ``groups`` that has a gradient, validating what the kernels rely on; return the
    buckets and the parameters without a gradient.

    ``groups`` are param-group-like mappings with ``params``, ``rho``, ``eta``, ``adaptive`` and optionally
    ``param_names`` (used in error messages). Raises on sparse gradients and on gradients whose shape, dtype or device
    differ from the parameter's. DTensor parameters are bucketed as their local shards, separately per set of
    process groups their norm share is summed over. ``bucket.grads`` holds the gradients seen here.
    """
    perturbed: dict[tuple, Bucket] = {}
    counted: dict[tuple, Bucket] = {}  # rho = 0: in the norm only
    absent: list[torch.Tensor] = []
    for gi, group in enumerate(groups):
        rho, eta, adaptive = float(group["rho"]), float(group["eta"]), bool(group["adaptive"])
        for pi, p in enumerate(group["params"]):
            key_p = p
            g = p.grad
            if g is None:
                absent.append(p)
                continue
            over: tuple = ()
            if is_dtensor(p):
                p, g, over = _local(p, g, param_name(group, gi, pi))
            check_gradient(p, g, param_name(group, gi, pi))
            key = (p.device, p.dtype, over)
            into = perturbed if rho > 0 else counted
            b = into.get(key)
            if b is None:
                b = into[key] = Bucket(device=p.device, dtype=p.dtype, reduce_over=over)
            b.keys.append(key_p)
            b.params.append(p)
            b.grads.append(g)
            b.adaptive.append(adaptive)
            b.eta.append(eta)
            b.rho.append(rho)
            b.group.append(gi)
    buckets = []
    for key in [*perturbed, *(k for k in counted if k not in perturbed)]:
        b = perturbed.get(key) or Bucket(device=key[0], dtype=key[1], reduce_over=key[2])
        b.n_perturbed = len(b.params)
        tail = counted.get(key)
        if tail is not None:
            for name in ("keys", "params", "grads", "adaptive", "eta", "rho", "group"):
                getattr(b, name).extend(getattr(tail, name))
        buckets.append(b)
    return buckets, absent
