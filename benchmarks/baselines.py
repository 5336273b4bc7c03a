"""Baselines the benchmarks compare fastasam against, other than its own backends.

``compiled_foreach``: the same ASAM + SGD step written with ``torch._foreach_*`` ops and handed to ``torch.compile``
(Inductor fuses the foreach ops into a few generated kernels). ``apex``: NVIDIA apex's ``multi_tensor_l2norm`` for
the norm and ``FusedSGD`` for the update, the perturbation in foreach ops (apex has no |w|-scaled op); available only
where apex is installed with its CUDA extensions.

Both take the parameters split the way the benchmarks group them: ``adaptive`` tensors (|w| + eta scaling, ASAM) and
``plain`` ones (SAM-style), one rho, SGD with momentum and weight decay. ``tests/test_benchmarks.py`` checks the
compiled baseline against ``fastasam.ASAM(backend="reference")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _first(wa, ga, wn, gn, ba, bn, rho: float, eta: float, eps: float) -> None:
    ta = torch._foreach_add(torch._foreach_abs(wa), eta)
    tga = torch._foreach_mul(ta, ga)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tga) + torch._foreach_norm(gn)))
    scale = torch.where(torch.isfinite(norm) & (norm > 0), rho / (norm + eps), 0.0)
    torch._foreach_copy_(ba, wa)
    torch._foreach_copy_(bn, wn)
    torch._foreach_add_(wa, torch._foreach_mul(torch._foreach_mul(tga, ta), scale))
    torch._foreach_add_(wn, torch._foreach_mul(gn, scale))


def _second(w, g, b, m, lr: float, momentum: float, weight_decay: float) -> None:
    torch._foreach_copy_(w, b)
    d = torch._foreach_add(g, w, alpha=weight_decay)
    torch._foreach_mul_(m, momentum)
    torch._foreach_add_(m, d)
    torch._foreach_add_(w, m, alpha=-lr)


def compiled_foreach(adaptive: list[torch.Tensor], plain: list[torch.Tensor], *, rho: float, eta: float, lr: float,
                     momentum: float, weight_decay: float, compile: bool = True) -> Callable[[], None]:
    """One ASAM + SGD-momentum step (first_step + second_step) over the parameters' current ``.grad``.

    The momentum buffer starts at zero, which gives torch's first step (buffer = gradient) exactly; the restore copies
    the saved weights back as fastasam's ``restore="copy"`` does."""
    first = torch.compile(_first) if compile else _first
    second = torch.compile(_second) if compile else _second
    wa, wn = [p.data for p in adaptive], [p.data for p in plain]
    ba, bn = [torch.empty_like(w) for w in wa], [torch.empty_like(w) for w in wn]
    moms = [torch.zeros_like(w) for w in wa + wn]

    def step() -> None:
        with torch.no_grad():
            first(wa, [p.grad for p in adaptive], wn, [p.grad for p in plain], ba, bn, rho, eta, 1e-12)
            second(wa + wn, [p.grad for p in adaptive + plain], ba + bn, moms, lr, momentum, weight_decay)
    return step


def apex_unavailable_reason() -> str | None:
    try:
        import amp_C  # noqa: F401
        from apex.multi_tensor_apply import multi_tensor_applier  # noqa: F401
        from apex.optimizers import FusedSGD  # noqa: F401
    except ImportError as exc:
        return f"NVIDIA apex with its CUDA extensions is not installed ({exc})"
    return None


def apex_asam(adaptive: list[torch.Tensor], plain: list[torch.Tensor], *, rho: float, eta: float, lr: float,
              momentum: float, weight_decay: float) -> Callable[[], None]:
    """ASAM + SGD with apex's multi-tensor norm and FusedSGD (CUDA only)."""
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier
    from apex.optimizers import FusedSGD

    params = adaptive + plain
    base = FusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    overflow = torch.zeros(1, dtype=torch.int, device=params[0].device)
    wa = [p.data for p in adaptive]
    saved = [torch.empty_like(p) for p in params]

    def step() -> None:
        with torch.no_grad():
            ga, gn = [p.grad for p in adaptive], [p.grad for p in plain]
            ta = torch._foreach_add(torch._foreach_abs(wa), eta)
            tga = torch._foreach_mul(ta, ga)
            norm, _ = multi_tensor_applier(amp_C.multi_tensor_l2norm, overflow, [tga + gn], False)
            scale = torch.where(torch.isfinite(norm) & (norm > 0), rho / (norm + 1e-12), 0.0)
            torch._foreach_copy_(saved, [p.data for p in params])
            torch._foreach_add_(wa, torch._foreach_mul(torch._foreach_mul(tga, ta), scale))
            torch._foreach_add_([p.data for p in plain], torch._foreach_mul(gn, scale))
            torch._foreach_copy_([p.data for p in params], saved)
        base.step()
    return step
