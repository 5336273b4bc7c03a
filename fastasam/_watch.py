"""The one cheap pass a warm step makes: confirm that nothing the step plan relies on has moved.

The multi-tensor kernels read tensors through addresses written into device tables when the plan was built. Between
steps a parameter's ``.grad`` is usually a new tensor (``zero_grad(set_to_none=True)``), which the caching allocator
often, but not always, places where the old one was; a parameter may get a gradient it did not have, or lose one. So
each phase reads every parameter's ``.grad`` once and compares, with C-level ``map`` calls and no Python call per
tensor:

* "kernel" tensors (their addresses are in a table): the parameter's and the gradient's address, and the gradient's
  layout (contiguous, or the strides recorded when the table was built). A parameter whose layout changes in place
  (``p.t_()``) gets, by autograd's layout contract, a gradient laid out like it: the gradient check sees it;
* other tensors with a gradient: that they still have one (their gradients are handed to per-tensor code each step);
* tensors without a gradient: that they still have none.

Any difference returns None and the step plan rebuilds what changed.

Two interchangeable implementations: ``fastasam._host.Watch`` (csrc/host.cpp, built by setup.py wherever PyTorch is;
it reads each tensor's storage allocation, offset, element count and dtype straight from the fields) and ``PyWatch``
below (C-level ``map`` calls over the same, several times slower), used when the extension is missing or
``FASTASAM_HOST=python`` is set. ``watch(...)`` makes whichever is in use; ``IMPLEMENTATION`` says which. What each
costs a step is measured in ``benchmarks/results/host-overhead-cpu.md``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from itertools import chain, repeat
from operator import attrgetter, is_, is_not, itemgetter

import torch

_grad = attrgetter("grad")
_params_of = itemgetter("params")
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_stride = torch.Tensor.stride
_numel = torch.Tensor.numel
_dtype = attrgetter("dtype")




class PyWatch:
    """What one phase checks. ``params`` = kernel tensors with contiguous parameters, then kernel tensors with other
    dense layouts, then the other tensors with a gradient (plain tensors, then DTensors); ``absent`` = tensors expected
    to have no gradient. ``check_params``: also compare the parameters' addresses (all but the DTensors, whose
    storage is their local shard's): the first phase; the second trusts them."""

    __slots__ = ("params", "absent", "n_kernel", "n_contiguous", "n_plain", "param_ptrs", "param_sizes", "grad_ptrs",
                 "grad_sizes", "grad_strides", "check_params", "state_dicts", "state_entries", "state_tensors",
                 "state_layouts")

    def __init__(self, kernel_contiguous: list[torch.Tensor], kernel_strided: list[torch.Tensor],
                 others: list[torch.Tensor], dtensors: list[torch.Tensor], absent: list[torch.Tensor],
                 check_params: bool, state: dict | None = None,
                 state_tensors: list[list[torch.Tensor]] | None = None) -> None:
        self.params = [*kernel_contiguous, *kernel_strided, *others, *dtensors]
        self.absent = absent
        self.n_contiguous = len(kernel_contiguous)
        self.n_kernel = len(kernel_contiguous) + len(kernel_strided)
        self.n_plain = len(self.params) - len(dtensors)
        self.check_params = check_params
        kernel = self.params[: self.n_kernel]
        grads = list(map(_grad, self.params))
        self.grad_sizes = list(zip(map(_numel, grads), map(_dtype, grads)))  # every tensor's: elements and dtype
        grads = grads[: self.n_kernel]
        self.grad_ptrs = list(map(_data_ptr, grads))
        self.grad_strides = list(map(_stride, grads[self.n_contiguous:]))
        plain = self.params[: self.n_plain] if check_params else []
        self.param_ptrs = list(map(_data_ptr, plain))
        self.param_sizes = list(zip(map(_numel, plain), map(_dtype, plain)))
        # the base optimizer's state (the fused update's watch): the state dict, each kernel tensor's own state dict,
        # their entries (objects, in order; references kept), and the layout of the state tensors the tables name
        self.state_dicts: list[dict] = []
        self.state_entries: list[list] = []
        self.state_tensors: list[torch.Tensor] = []
        self.state_layouts: list[tuple] = []
        if state is not None:
            if not isinstance(state, dict) or len(state_tensors or ()) != self.n_kernel:
                raise ValueError("fastasam: a watch of the state needs a dict and one state entry per kernel tensor")
            self.state_dicts = [state, *(state[p] for p in kernel)]
            if not all(isinstance(d, dict) for d in self.state_dicts):
                raise TypeError("fastasam: a kernel tensor's state must be a dict")
            self.state_entries = (list(map(len, self.state_dicts)),
                                  list(chain.from_iterable(map(dict.values, self.state_dicts))))
            self.state_tensors = [t for row in state_tensors for t in row]
            self.state_layouts = self._state_layouts()

    def __len__(self) -> int:
        return len(self.params) + len(self.absent)

    def params_intact(self) -> bool:
        """Whether every parameter but the DTensors is where it was, with as many elements of the same dtype: the
        tables still point at the parameters' current memory. True for a watch without ``check_params``."""
        if not self.check_params:
            return True
        plain = self.params if self.n_plain == len(self.params) else self.params[: self.n_plain]
        try:
            return (list(map(_data_ptr, plain)) == self.param_ptrs
                    and list(zip(map(_numel, plain), map(_dtype, plain))) == self.param_sizes)
        except RuntimeError:  # a parameter without storage
            return False

    def _state_layouts(self) -> tuple:
        ts = self.state_tensors
        return list(map(_data_ptr, ts)), list(map(_numel, ts)), list(map(_dtype, ts))

    def state_intact(self) -> bool:
        """Whether the base optimizer's state is as recorded: the same values (objects) in the state dict and in
        each kernel tensor's own, and each state tensor the tables name where and as large as it was. True without
        a state. C-level passes, no Python call per tensor."""
        if not self.state_dicts:
            return True
        sizes, values = self.state_entries
        dicts = self.state_dicts
        if list(map(len, dicts)) != sizes or not all(
                map(is_, chain.from_iterable(map(dict.values, dicts)), values)):
            return False
        return self._state_layouts() == self.state_layouts

    def check(self) -> list[torch.Tensor] | None:
        """The current gradients of the non-kernel ``params`` (``params[n_kernel:]``) when nothing moved, else None.
        One pass; no Python call per tensor."""
        params = self.params
        grads = list(map(_grad, params))
        n, c = self.n_kernel, self.n_contiguous
        kernel_grads = grads[:n] if n < len(grads) else grads
        try:
            if self.check_params and not self.params_intact():
                return None
            if n and list(map(_data_ptr, kernel_grads)) != self.grad_ptrs:  # TypeError on a None gradient
                return None
        except (TypeError, RuntimeError):  # no gradient, or one without storage
            return None

        if c and not all(map(_is_contiguous, kernel_grads[:c] if c < n else kernel_grads)):
            return None
        if c < n and list(map(_stride, kernel_grads[c:])) != self.grad_strides:
            return None
        if n < len(grads) and any(map(is_, grads[n:], repeat(None))):
            return None
        if list(zip(map(_numel, grads), map(_dtype, grads))) != self.grad_sizes:
            return None
        if self.absent and any(map(is_not, map(_grad, self.absent), repeat(None))):
            return None
        if self.state_dicts and not self.state_intact():
            return None
        return grads[n:] if n else grads


def _host_module():
    if os.environ.get("FASTASAM_HOST", "").strip().lower() == "python":
        return None, "FASTASAM_HOST=python"
    try:
        from . import _host
    except ImportError as exc:
        return None, f"fastasam._host is not built ({exc})"
    return _host, "fastasam._host (C++)"


_HOST, IMPLEMENTATION = _host_module()


def cpp_in_use() -> bool:
    """Whether plans built now check their tensors with ``fastasam._host``."""
    return _HOST is not None


@contextlib.contextmanager
def using(implementation: str) -> Iterator[None]:
    """Plans built inside check their tensors with ``"c++"`` (``fastasam._host``) or ``"python"`` (``PyWatch``);
    tests and benchmarks. The choice in force before is restored on exit."""
    global _HOST, IMPLEMENTATION
    before = _HOST, IMPLEMENTATION
    if implementation == "python":
        _HOST, IMPLEMENTATION = None, "python (fastasam._watch.PyWatch)"
    elif implementation == "c++":
        from . import _host

        _HOST, IMPLEMENTATION = _host, "fastasam._host (C++)"
    else:
        raise ValueError(f"implementation must be 'c++' or 'python', not {implementation!r}")
    try:
        yield
    finally:
        _HOST, IMPLEMENTATION = before


def watch(kernel_contiguous: list[torch.Tensor], kernel_strided: list[torch.Tensor], others: list[torch.Tensor],
          dtensors: list[torch.Tensor], absent: list[torch.Tensor], check_params: bool, state: dict | None = None,
          state_tensors: list[list[torch.Tensor]] | None = None):
    """A watch over these tensors (see ``PyWatch``), in C++ when ``fastasam._host`` is in use. ``state``: the base
    optimizer's state dict, and ``state_tensors`` the state tensors of each kernel tensor (contiguous ones first, as
    here), which ``state_intact()`` (and ``check()``) then confirm."""
    if _HOST is None:
        return PyWatch(kernel_contiguous, kernel_strided, others, dtensors, absent, check_params, state, state_tensors)
    params = [*kernel_contiguous, *kernel_strided, *others, *dtensors]
    n_kernel = len(kernel_contiguous) + len(kernel_strided)
    return _HOST.Watch(params, list(absent), n_kernel, len(kernel_contiguous), len(params) - len(dtensors),
                       check_params, state, [list(row) for row in state_tensors or ()])


def same_params(groups: list, expected: list) -> bool:
    """Whether the groups' ``"params"`` lists, end to end, hold exactly the objects of ``expected``, in order."""
    if _HOST is not None:
        return _HOST.same_params(groups, expected)
    lists = list(map(_params_of, groups))
    return sum(map(len, lists)) == len(expected) and all(map(is_, chain.from_iterable(lists), expected))
