"""What the fused restore + update needs to know about each base optimizer it can replace: which param groups it can
serve, how torch.optim names and creates each tensor's state, and the hyper-parameter row its kernel reads.

One class per optimizer family (``torch.optim.SGD``; ``torch.optim.Adam`` / ``AdamW``), each mirroring torch's own
update: hyper-parameters are combined on the host in double precision exactly as torch.optim combines them
(``1 - dampening``, ``1 - lr * weight_decay``, ``lr / (1 - beta1 ** step)``, ...) and rounded once into the fp32
``hyper`` table (``_layout``), which is what torch's fp32 kernels receive as scalars.

A class names its kernel (``kernel``) and the columns of its hyper row (``columns``: the fields, in order, of the
kernel's hyper-parameter struct in ``csrc/elementwise.h``); ``FUSED_UPDATES`` lists the classes in the order of that
header's ``FA_FUSED_UPDATES``. Every signature, registration and binding of the kernel derives from these
(``_signatures``; ``tests/test_signatures.py`` compares them with the C sources).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _layout as L


def flat_like(t: torch.Tensor, like: torch.Tensor) -> bool:
    """True when ``t`` covers its memory densely, laid out exactly like ``like`` (element i of one is element i of
    the other)."""
    if t.is_contiguous() and like.is_contiguous():
        return True
    return t.shape == like.shape and t.stride() == like.stride() and _dense(t)


def _dense(t: torch.Tensor) -> bool:
    """The elements of ``t`` fill ``numel`` consecutive memory slots, each once (any dimension order)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _state_ok(t: torch.Tensor | None, p: torch.Tensor) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype == p.dtype and t.device == p.device and t.shape == p.shape
            and flat_like(t, p))


def _tensor_option(group: dict, names: Sequence[str]) -> str | None:
    for n in names:
        v = group.get(n)
        values = v if isinstance(v, tuple) else (v,)
        if any(isinstance(x, torch.Tensor) for x in values):
            return f"{n} is a tensor"
    return None


class SGDUpdate:
    """``torch.optim.SGD``: momentum (buffer ``momentum_buffer``, created as ``d_p`` on a tensor's first step),
    dampening, nesterov, weight decay, maximize."""

    kernel = "restore_sgd"
    columns = ("lr", "momentum", "one_minus_dampening", "weight_decay", "has_momentum", "nesterov", "maximize")
    # the options a group's fused update depends on; a change of any of them re-reads the group
    options = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "differentiable")

    counts_steps = False  # a step count per tensor, counted by the plan (steps_for)

    def group_reason(self, group: dict) -> str | None:
        """Why the tensors of this group cannot be fused (None: they can)."""
        if group.get("differentiable"):
            return "differentiable=True"
        return _tensor_option(group, ("lr", "momentum", "dampening", "weight_decay"))

    def structure(self, group: dict) -> tuple:
        """What of a group's options decides the plan itself (which state its tensors have)."""
        return (group["momentum"] != 0,)

    def state_columns(self, p: torch.Tensor, state: dict, group: dict) -> tuple[list, bool] | str:
        """(the S1..S3 state tensors, whether they are new) for a fused step of ``p``, creating what torch would
        create; or the reason ``p`` cannot be fused. Called only for a tensor that is otherwise fused."""
        if group["momentum"] == 0:
            return [None, None, None], False
        buf = state.get("momentum_buffer")
        if buf is None:  # the kernel writes d_p into it (zeros until then, should the launch not happen)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return [state["momentum_buffer"], None, None], True
        if not _state_ok(buf, p):
            return "its momentum buffer is not laid out like it"
        return [buf, None, None], False

    def hyper_row(self, group: dict, step: float) -> list[float]:
        momentum = group["momentum"]
        return _row(self, lr=group["lr"], momentum=momentum, one_minus_dampening=1 - group["dampening"],
                    weight_decay=group["weight_decay"], has_momentum=float(momentum != 0),
                    nesterov=float(bool(group["nesterov"])), maximize=float(bool(group["maximize"])))



class AdamUpdate:
    """``torch.optim.Adam`` and ``AdamW``: moments ``exp_avg`` / ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad),
    L2 or decoupled weight decay, maximize, and a per-tensor ``step`` count on the CPU.

    The fused kernel applies one bias correction per param group, so the group's fused tensors must share one step
    count. Their ``state["step"]`` tensors are made 0-d views of one CPU tensor per group (each tensor keeps its own
    element), so one ``add_`` counts a step for all of them, as torch's foreach ``_foreach_add_`` would element by
    element; a checkpoint holds the same numbers either way.

    A group with ``fused=True`` (or ``capturable=True``) on a GPU is left to torch's own update: torch keeps its step
    counts on the parameters' device and its fused CUDA kernel reads them there, so a CPU step count made here would
    reach that kernel as soon as a tensor of the group falls back to the base optimizer's step (a gradient laid out
    differently, a plan rebuilt). Those tensors are restored, then stepped by torch."""

    kernel = "restore_adam"
    columns = ("lerp_weight", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay_factor", "step_size",
               "bc2_sqrt", "amsgrad", "maximize")  # lerp_weight: 1 - beta1
    options = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable", "differentiable",
               "decoupled_weight_decay", "fused")

    counts_steps = True

    def __init__(self, decoupled_default: bool) -> None:
        self.decoupled_default = decoupled_default

    def structure(self, group: dict) -> tuple:
        return bool(group["amsgrad"]), self.decoupled(group)

    def group_reason(self, group: dict) -> str | None:
        if group.get("capturable"):
            return "capturable=True (torch's own update keeps its step count on the device)"
        if group.get("fused") and any(p.device.type != "cpu" for p in group["params"]):
            return ("fused=True on a GPU (torch's fused Adam keeps its step count on the device, where fastasam's "
                    "fused update keeps it on the CPU; fused=False lets fastasam fuse the restore and the update)")
        if group.get("differentiable"):
            return "differentiable=True"
        return _tensor_option(group, ("lr", "betas", "eps", "weight_decay"))

    def state_columns(self, p: torch.Tensor, state: dict, group: dict) -> tuple[list, bool] | str:
        if len(state) == 0:  # what torch.optim.Adam's first step creates (the step count is made by steps_for)
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=dtype)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = state.get("step")
        if not isinstance(step, torch.Tensor) or step.device.type != "cpu" or step.numel() != 1:
            return "its Adam step count is not a CPU scalar tensor"
        if not (_state_ok(state.get("exp_avg"), p) and _state_ok(state.get("exp_avg_sq"), p)):
            return "its Adam moments are missing or not laid out like it"
        if group["amsgrad"]:
            if "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not _state_ok(state["max_exp_avg_sq"], p):
                return "its max_exp_avg_sq is not laid out like it"
        vmax = state.get("max_exp_avg_sq") if group["amsgrad"] else None
        return [state["exp_avg"], state["exp_avg_sq"], vmax], False

    def decoupled(self, group: dict) -> bool:
        return bool(group.get("decoupled_weight_decay", self.decoupled_default))

    def hyper_row(self, group: dict, step: float) -> list[float]:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        decoupled = self.decoupled(group)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return _row(self, lerp_weight=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=group["eps"],
                    weight_decay=0.0 if decoupled else wd,
                    decay_factor=1 - lr * wd if (decoupled and wd != 0) else 1.0, step_size=lr / bias_correction1,
                    bc2_sqrt=bias_correction2**0.5, amsgrad=float(bool(group["amsgrad"])),
                    maximize=float(bool(group["maximize"])))

    def steps_for(self, states: list[dict]) -> torch.Tensor:
        """One CPU tensor holding the step counts of a group's fused tensors, each ``state["step"]`` re-pointed to its
        own element (values and dtype kept). The counts must be equal (checked by the caller)."""
        first = states[0]["step"]
        steps = torch.empty(len(states), dtype=first.dtype)
        for i, st in enumerate(states):
            steps[i] = st["step"]
            st["step"] = steps[i]
        return steps


def _row(update: FusedUpdate, **values: float) -> list[float]:
    """The hyper row: ``values`` in the order of the update's ``columns``, padded to the table's width."""
    row = [values.pop(c) for c in update.columns]
    if values:
        raise KeyError(f"fastasam: {sorted(values)} are not columns of {type(update).__name__}")
    return row + [0.0] * (L.NHYPER - len(row))


# the fused updates in the order of csrc/elementwise.h's FA_FUSED_UPDATES
FUSED_UPDATES: tuple[type, ...] = (SGDUpdate, AdamUpdate)
FusedUpdate = SGDUpdate | AdamUpdate

_FUSED = {torch.optim.SGD: SGDUpdate(), torch.optim.Adam: AdamUpdate(False), torch.optim.AdamW: AdamUpdate(True)}


def fused_update_for(base: torch.optim.Optimizer) -> FusedUpdate | None:
    """The fused update that can replace ``base.step()`` for its tensors, or None (any other optimizer class; a
    subclass may change the update, so only the exact classes qualify)."""
    return _FUSED.get(type(base))
