"""Baselines the benchmarks compare fastasam against, other than its own backends.

The published loops, transcribed as plain per-tensor torch ops exactly as their repositories run them (their code is
not shipped here): ``OfficialASAM``, the ASAM paper's ``asam.py`` (``ascent_step`` + ``descent_step``);
``CommunitySAM``, the widely used community ``sam.py`` (``first_step`` + ``second_step``, ``adaptive`` for its ASAM
form); ``AuthorsMSAM``, the Momentum-SAM authors' SGD step; and ``pytorch_optimizer_sam``, the ``pytorch_optimizer``
package's ``SAM`` itself where it is installed (an optional bench dependency).

``compiled_foreach``: the same ASAM + SGD step written with ``torch._foreach_*`` ops and handed to ``torch.compile``
(Inductor fuses the foreach ops into a few generated kernels). ``apex``: NVIDIA apex's ``multi_tensor_l2norm`` for
the norm and ``FusedSGD`` for the update, the perturbation in foreach ops (apex has no |w|-scaled op); available only
where apex is installed with its CUDA extensions.

Both take the parameters split the way the benchmarks group them: ``adaptive`` tensors (|w| + eta scaling, ASAM) and
``plain`` ones (SAM-style), one rho, SGD with momentum and weight decay. ``tests/test_benchmarks.py`` checks the
compiled baseline against ``fastasam.ASAM(backend="reference")``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch


class OfficialASAM:
    """The official asam.py ``ASAM`` step, op for op: per-tensor loops over the named parameters, ``|w| + eta`` kept
    in a per-parameter buffer, the norm of the per-tensor norms, restore by subtraction, then the base step. ASAM
    scaling for parameters whose name holds ``weight``, SAM for the others (the repository's rule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, named: list, rho: float, eta: float) -> None:
        self.optimizer, self.named, self.rho, self.eta = optimizer, named, rho, eta
        self.state: dict = defaultdict(dict)

    @torch.no_grad()
    def ascent_step(self) -> None:
        wgrads = []
        for n, p in self.named:
            if p.grad is None:
                continue
            t_w = self.state[p].get("eps")
            if t_w is None:
                t_w = torch.clone(p).detach()
                self.state[p]["eps"] = t_w
            if "weight" in n:
                t_w[...] = p[...]
                t_w.abs_().add_(self.eta)
                p.grad.mul_(t_w)
            wgrads.append(torch.norm(p.grad, p=2))
        wgrad_norm = torch.norm(torch.stack(wgrads), p=2) + 1.0e-16
        for n, p in self.named:
            if p.grad is None:
                continue
            t_w = self.state[p].get("eps")
            if "weight" in n:
                p.grad.mul_(t_w)
            eps = t_w
            eps[...] = p.grad[...]
            eps.mul_(self.rho / wgrad_norm)
            p.add_(eps)

    @torch.no_grad()
    def descent_step(self) -> None:
        for _, p in self.named:
            if p.grad is None:
                continue
            p.sub_(self.state[p]["eps"])
        self.optimizer.step()

    def step(self) -> None:
        """One step over the current gradients: ``ascent_step`` then ``descent_step`` (the second pass's backward is
        not part of what is timed)."""
        self.ascent_step()
        self.descent_step()


class CommunitySAM:
    """The community ``sam.py`` ``SAM`` step, op for op: the norm of the per-tensor norms of ``g`` (``|w| * g`` when
    ``adaptive``), a clone of every parameter kept as ``old_p``, ``e_w = (w^2 if adaptive else 1) * g * scale`` added
    in place; the second step rebinds ``p.data`` to ``old_p`` and runs the base step."""

    def __init__(self, params: list[torch.Tensor], base: torch.optim.Optimizer, rho: float, adaptive: bool) -> None:
        self.params, self.base, self.rho, self.adaptive = params, base, rho, adaptive
        self.state: dict = defaultdict(dict)

    def _grad_norm(self) -> torch.Tensor:
        shared = self.params[0].device
        return torch.norm(torch.stack([((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2).to(shared)
                                       for p in self.params if p.grad is not None]), p=2)

    @torch.no_grad()
    def first_step(self) -> None:
        scale = self.rho / (self._grad_norm() + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.state[p]["old_p"] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.state[p]["old_p"]
        self.base.step()

    def step(self) -> None:
        self.first_step()
        self.second_step()


class AuthorsMSAM:
    """The Momentum-SAM authors' SGD step (Becker et al. 2024), op for op as their repository runs it: per tensor the
    weight decay added to the gradient in place (at the perturbed point), the move back ``p += rho * inv * buf``,
    ``buf = momentum * buf + d_p``, ``p -= lr * buf``; the norm of the per-tensor norms of the new buffers; then
    ``p -= rho * inv * buf`` with the new inverse norm (a 0-d tensor passed as ``alpha``: one host read a step, as
    theirs). Buffers start at zero."""

    def __init__(self, params: list[torch.Tensor], *, rho: float, lr: float, momentum: float,
                 weight_decay: float) -> None:
        self.params, self.rho, self.lr, self.momentum, self.weight_decay = params, rho, lr, momentum, weight_decay
        self.buffers = [torch.zeros_like(p) for p in params]
        self.inverse_norm: torch.Tensor | float = 0.0

    @torch.no_grad()
    def step(self) -> None:
        bufs = []
        for p, buf in zip(self.params, self.buffers, strict=True):
            if p.grad is None:
                continue
            d_p = p.grad
            if self.weight_decay != 0:
                d_p.add_(p, alpha=self.weight_decay)
            p.add_(buf, alpha=self.rho * self.inverse_norm)
            buf.mul_(self.momentum).add_(d_p)
            p.add_(buf, alpha=-self.lr)
            bufs.append(buf)
        norm = torch.norm(torch.stack([b.norm(p=2) for b in bufs]), p=2)
        self.inverse_norm = 1 / (norm + 1e-12)
        for p, buf in zip(self.params, self.buffers, strict=True):
            if p.grad is not None:
                p.sub_(buf, alpha=self.rho * self.inverse_norm)


def pytorch_optimizer_unavailable_reason() -> str | None:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError as exc:
        return f"pytorch_optimizer is not installed ({exc}; pip install --no-deps pytorch_optimizer)"
    return None


def pytorch_optimizer_sam(params: list[torch.Tensor], *, rho: float, adaptive: bool, lr: float, momentum: float,
                          weight_decay: float) -> Callable[[], None]:
    """``pytorch_optimizer.SAM`` (its default per-tensor loop) over SGD momentum: ``first_step`` + ``second_step``."""
    from pytorch_optimizer import SAM

    opt = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=momentum,
              weight_decay=weight_decay)
    return _both_steps(opt)


def _both_steps(opt) -> Callable[[], None]:
    """A pytorch_optimizer two-pass optimizer's step: ``first_step`` + ``second_step``, the gradients kept."""
    def step() -> None:
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)
    return step


def pytorch_optimizer_peer(kind: str, params: list[torch.Tensor], *, rho: float, lr: float, momentum: float,
                           weight_decay: float, num_data: int) -> Callable[[], None]:
    """pytorch_optimizer's ``FriendlySAM``, ``WSAM`` (over SGD momentum) or ``BSAM`` (its own update), with
    ``foreach=True`` (its fastest form), defaults otherwise: one optimizer step over the parameters' ``.grad``
    (FriendlySAM, WSAM: ``first_step`` + ``second_step``; BSAM: its noise, perturbation and update steps)."""
    import pytorch_optimizer as po

    if kind == "bsam":
        opt = po.BSAM(params, num_data=num_data, lr=lr, weight_decay=weight_decay, rho=rho, foreach=True)

        def bsam_step() -> None:
            opt.first_step()
            opt.second_step()
            opt.third_step()
        return bsam_step
    sgd = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    if kind == "friendlysam":
        opt = po.FriendlySAM(params, torch.optim.SGD, rho=rho, foreach=True, **sgd)
    else:  # WSAM takes a model for its BatchNorm handling and clipping: one holding the parameters
        opt = po.WSAM(torch.nn.ParameterList(params), params, torch.optim.SGD, rho=rho, foreach=True, **sgd)
    return _both_steps(opt)


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
