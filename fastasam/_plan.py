"""What one ``first_step`` works on: the parameters that have a gradient, bucketed by (device, dtype).

Every backend receives :class:`Bucket` objects and nothing else, so the optimizer classes, the reference oracle and
the fast paths agree on one description of the job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

RESTORE_MODES = ("copy", "subtract")


@dataclass
class Bucket:
    """All tensors of one (device, dtype) that take part in one step.

    ``params[i]`` / ``grads[i]`` share shape, device and dtype. ``adaptive[i]``, ``eta[i]`` and ``rho[i]`` are the
    options of the group the tensor came from (``group[i]`` its index; a group's tensors are consecutive).
    ``buffers[i]`` is the one parameter-sized buffer kept for the restore:
    the original weight (``restore="copy"``) or the perturbation ``e`` (``restore="subtract"``), in the storage dtype.
    ``scales[i]`` is a 0-d tensor on ``device`` holding ``rho / (norm + eps)`` (0 when the norm is not finite or is 0);
    tensors of one group share the same scale tensor object.
    """

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    adaptive: list[bool] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    finite: torch.Tensor | None = None  # 0-d bool on device: the global norm is finite
    group: list[int] = field(default_factory=list)  # index of the param group each tensor came from
    plan: object = None  # a backend's own description of the bucket (kept from perturb_ to restore_)
    # the parameter objects themselves (``params[i]`` is their local shard for a DTensor, else the same object)
    keys: list[torch.Tensor] = field(default_factory=list)
    # process groups over which the squared norm share is summed (the Shard dims of the DTensors' mesh); empty when
    # the tensors are whole (or replicated) on every rank
    reduce_over: tuple = ()

    @property
    def dtensor_shards(self) -> bool:
        """The tensors are local shards of DTensor parameters (the optimizer's state is keyed by ``keys``)."""
        return any(k is not p for k, p in zip(self.keys, self.params))

    def option_runs(self) -> list[tuple[bool, float, torch.Tensor | None, list[int]]]:
        """Indices grouped by (adaptive, eta, scale), in first-seen order: one foreach call per run.

        Before the norm is known (``scales`` empty) the runs are grouped by (adaptive, eta) and carry no scale."""
        runs: dict[tuple[bool, float, int], tuple[bool, float, torch.Tensor | None, list[int]]] = {}
        scales = self.scales or [None] * len(self.params)
        for i, (a, eta, s) in enumerate(zip(self.adaptive, self.eta, scales, strict=True)):
            key = (a, eta if a else 0.0, id(s))
            if key not in runs:
                runs[key] = (a, eta if a else 0.0, s, [])
            runs[key][3].append(i)
        return list(runs.values())


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32 for fp32/fp16/bf16 storage, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_name(group: Mapping, gi: int, pi: int) -> str:
    """How an error message names a parameter: its ``param_names`` entry where the group has one."""
    names = group.get("param_names")
    return names[pi] if names else f"param_groups[{gi}]['params'][{pi}]"


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local(p: torch.Tensor, g: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """A DTensor parameter (FSDP2 ``fully_shard``, tensor parallel) as its local shard and the process groups its
    squared-norm share must be summed over: one per mesh dim the parameter is sharded on (replicated dims hold equal
    copies, so summing over them would count the shard twice)."""
    if not _is_dtensor(g) or tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        got = tuple(g.placements) if _is_dtensor(g) else "a plain tensor"
        raise RuntimeError(
            f"fastasam: {name} is a DTensor with placements {tuple(p.placements)} but its gradient is {got}; they "
            "must match (a Partial gradient has not been reduced yet). Call first_step() after backward() has "
            "finished, with FSDP2 or DTensor-aware data parallelism doing the reduction."
        )
    for placement in p.placements:
        if not (placement.is_shard() or placement.is_replicate()):
            raise RuntimeError(f"fastasam: {name} has placement {placement}; only Shard and Replicate are supported.")
    mesh = p.device_mesh
    over = tuple(mesh.get_group(d) for d, placement in enumerate(p.placements) if placement.is_shard())
    return p.to_local(), g.to_local(), over


def build_buckets(groups: Iterable[Mapping]) -> list[Bucket]:
    """Bucket every parameter of ``groups`` that has a gradient, validating what the kernels rely on.

    ``groups`` are param-group-like mappings with ``params``, ``rho``, ``eta``, ``adaptive`` and optionally
    ``param_names`` (used in error messages). Raises on sparse gradients and on gradients whose shape, dtype or device
    differ from the parameter's. DTensor parameters are bucketed as their local shards, separately per set of
    process groups their norm share is summed over.
    """
    buckets: dict[tuple, Bucket] = {}
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            key_p = p
            g = p.grad
            if g is None:
                continue
            over: tuple = ()
            if _is_dtensor(p):
                p, g, over = _local(p, g, _param_name(group, gi, pi))
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(
                    f"fastasam: {_param_name(group, gi, pi)} has a sparse gradient; ASAM/SAM need dense gradients. "
                    "Use dense embeddings (sparse=False) or leave this parameter out of the optimizer."
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"fastasam: {_param_name(group, gi, pi)} has dtype {p.dtype}; only floating-point parameters "
                    "are supported."
                )
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise RuntimeError(
                    f"fastasam: {_param_name(group, gi, pi)} has a gradient of shape {tuple(g.shape)}, {g.dtype} on "
                    f"{g.device} but the parameter is {tuple(p.shape)}, {p.dtype} on {p.device}; they must match."
                )
            key = (p.device, p.dtype, over)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(device=p.device, dtype=p.dtype, reduce_over=over)
            bucket.keys.append(key_p)
            bucket.params.append(p)
            bucket.grads.append(g)
            bucket.adaptive.append(bool(group["adaptive"]))
            bucket.eta.append(float(group["eta"]))
            bucket.rho.append(float(group["rho"]))
            bucket.group.append(gi)
    return list(buckets.values())


def subset(bucket: Bucket, keep: Sequence[bool]) -> Bucket:
    """The bucket restricted to the tensors where ``keep`` is true (shares tensors, not lists)."""
    out = Bucket(device=bucket.device, dtype=bucket.dtype, finite=bucket.finite, reduce_over=bucket.reduce_over)
    for name in ("params", "grads", "adaptive", "eta", "rho", "buffers", "scales", "group", "keys"):
        src = getattr(bucket, name)
        if src:
            setattr(out, name, [x for x, k in zip(src, keep) if k])
    return out
