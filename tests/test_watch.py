"""The warm step's one pass over the tensors (fastasam/_watch.py): the C++ ``fastasam._host.Watch`` and the Python
``PyWatch`` say the same thing in every situation the step plan relies on them for, and each notices every change."""

from __future__ import annotations

import os

import pytest
import torch

from fastasam import _watch

HOST_EXPECTED = os.environ.get("FASTASAM_BUILD_HOST", "").strip().lower() not in ("0", "false", "no", "off")


def test_the_cpp_pass_is_built_and_in_use() -> None:
    """setup.py builds fastasam._host wherever PyTorch is (FASTASAM_BUILD_HOST=0 opts out): a missing build is a
    failure here, not a silent fall back to the slower Python pass."""
    if not HOST_EXPECTED or os.environ.get("FASTASAM_HOST") == "python":
        assert _watch.IMPLEMENTATION.startswith(("python", "FASTASAM_HOST", "fastasam._host is not built"))
        return
    from fastasam import _host  # noqa: F401  ImportError: the build failed (pip install -v -e . says why)

    assert _watch.IMPLEMENTATION == "fastasam._host (C++)"


IMPLS = ["c++", "python"] if HOST_EXPECTED else ["python"]


def _make(impl: str, *args, **kwargs):
    with _watch.using(impl):
        return _watch.watch(*args, **kwargs)


def setup_tensors():
    """Two contiguous kernel tensors, one transposed (strided) kernel tensor, one other tensor with a gradient, one
    without."""
    a, b = torch.zeros(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True)
    s = torch.zeros(3, 4).t().requires_grad_()
    o, n = torch.zeros(2, requires_grad=True), torch.zeros(6, requires_grad=True)
    for p in (a, b, s, o):
        p.grad = torch.ones_like(p)
    b.grad = torch.ones(6)[:5]  # a view at offset 0 of a larger storage: it can move within that storage
    return a, b, s, o, n


def move(p: torch.Tensor) -> None:
    with torch.no_grad():
        p.set_(torch.zeros(p.shape))


def swap(p: torch.Tensor) -> None:
    """torch.utils.swap_tensors: the Python object ``p`` now holds another tensor (with its own gradient), and the
    tensor it held goes to an object that is dropped at once (a pass that kept the old tensor would read freed
    memory)."""
    other = torch.zeros(p.shape, requires_grad=True)
    other.grad = torch.ones(p.shape)
    torch.utils.swap_tensors(p, other)
    del other


def renew(p: torch.Tensor) -> None:
    """A new gradient object at the old one's address (what zero_grad(set_to_none=True) + backward often gives)."""
    p.grad = p.grad.detach()


CHANGES = {
    "nothing": lambda a, b, s, o, n: None,
    "new gradient objects, same addresses": lambda a, b, s, o, n: [renew(p) for p in (a, b, s, o)],
    "a kernel gradient moved": lambda a, b, s, o, n: setattr(b, "grad", b.grad.clone()),
    "a kernel gradient one element further in its storage": lambda a, b, s, o, n: setattr(
        b, "grad", b.grad.as_strided((5,), (1,), 1)),
    "torch.utils.swap_tensors gave a parameter object another tensor": lambda a, b, s, o, n: swap(a),
    "a kernel gradient vanished": lambda a, b, s, o, n: setattr(a, "grad", None),
    "a kernel gradient at the same address, other strides": lambda a, b, s, o, n: setattr(
        s, "grad", s.grad.as_strided(s.shape, (1, 3))),
    "a contiguous gradient becomes strided in place": lambda a, b, s, o, n: setattr(
        a, "grad", a.grad.as_strided(a.shape, (1, 4))),
    "an other tensor lost its gradient": lambda a, b, s, o, n: setattr(o, "grad", None),
    "an other tensor's gradient moved (allowed)": lambda a, b, s, o, n: setattr(o, "grad", o.grad.clone()),
    "an absent tensor got a gradient": lambda a, b, s, o, n: setattr(n, "grad", torch.ones(6)),
    "a parameter moved": lambda a, b, s, o, n: move(a),
    "a parameter outside the kernels moved": lambda a, b, s, o, n: move(o),
}
NOTICED = {"a kernel gradient moved", "a kernel gradient vanished",
           "a kernel gradient one element further in its storage",
           "torch.utils.swap_tensors gave a parameter object another tensor",
           "a kernel gradient at the same address, other strides", "a contiguous gradient becomes strided in place",
           "an other tensor lost its gradient",
           "an absent tensor got a gradient", "a parameter moved", "a parameter outside the kernels moved"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("check_params", [True, False])
def test_watch_notices_exactly_what_moved(impl: str, change: str, check_params: bool) -> None:
    a, b, s, o, n = setup_tensors()
    w = _make(impl, [a, b], [s], [o], [], [n], check_params=check_params)
    assert len(w) == 5
    first = w.check()
    assert first is not None and len(first) == 1 and first[0] is o.grad
    CHANGES[change](a, b, s, o, n)
    got = w.check()
    noticed = change in NOTICED and (check_params or not change.startswith("a parameter"))
    if noticed:
        assert got is None, change
    else:
        assert got is not None and len(got) == 1 and got[0] is o.grad, change


@pytest.mark.parametrize("impl", IMPLS)
def test_watch_without_others_returns_an_empty_list_and_dtensor_slots_are_not_address_checked(impl: str) -> None:
    a, b, s, o, n = setup_tensors()
    w = _make(impl, [a], [], [], [], [], check_params=True)
    assert w.check() == []
    w = _make(impl, [a], [], [], [o], [], check_params=True)  # o stands in for a DTensor: only "has a gradient"
    move(o)
    got = w.check()
    assert got is not None and got[0] is o.grad
    o.grad = None
    assert w.check() is None


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_and_missing_gradients_do_not_crash(impl: str) -> None:
    a, b, s, o, n = setup_tensors()
    w = _make(impl, [a, b], [], [], [], [], check_params=True)
    b.grad = torch.ones(5).to_sparse()
    assert w.check() is None


@pytest.mark.parametrize("impl", IMPLS)
def test_same_params(impl: str) -> None:
    with _watch.using(impl):
        ps = [torch.zeros(1) for _ in range(5)]
        groups = [{"params": ps[:2]}, {"params": ps[2:]}]
        assert _watch.same_params(groups, ps)
        assert _watch.same_params([{"params": tuple(ps[:2])}, {"params": ps[2:]}], ps)
        assert not _watch.same_params(groups, ps[:4])
        assert not _watch.same_params(groups, [*ps, torch.zeros(1)])
        assert not _watch.same_params([{"params": ps[:2]}, {"params": [ps[2], torch.zeros(1), ps[4]]}], ps)
        assert not _watch.same_params(groups, list(reversed(ps)))
