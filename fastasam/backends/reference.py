"""The reference oracle: ASAM/SAM written tensor by tensor in plain PyTorch.

This file is the one place the formula lives. Every fast backend is tested against it, and it is the
backend that always works, on every device and dtype.

For a parameter ``w`` with gradient ``g`` (math in fp32 for fp16/bf16/fp32 storage, fp64 for fp64):

    T_w   = |w| + eta          if the tensor is adaptive, else 1
    norm  = sqrt( sum over all tensors of sum((T_w * g)^2) )                  (one global scalar)
    scale = rho / (norm + eps)  if norm is finite and > 0, else 0               (per group: rho is the group's)
    e     = T_w * (T_w * g) * scale, and 0 wherever the norm is not finite       (no NaN ever reaches w)
    w    <- w + e

and the restore either copies the saved ``w`` back (``restore="copy"``, bit-exact) or subtracts the stored ``e``
(``restore="subtract"``, what the official asam.py does). In ``subtract`` mode ``e`` is rounded to the storage dtype
once and that rounded value is both added and subtracted.
"""

from __future__ import annotations

import torch

from .._plan import Bucket, accumulate_dtype

name = "reference"
traceable = True  # torch.compile traces its tensor ops


def device_supported(device: torch.device) -> str | None:
    """Every device works."""
    return None


def _scaled_grad(w: torch.Tensor, g: torch.Tensor, adaptive: bool, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_w, T_w * g)`` in the accumulate dtype; ``T_w`` is 1 (a 0-d tensor) for a non-adaptive tensor."""
    acc = accumulate_dtype(w.dtype)
    g = g.to(acc)
    if not adaptive:
        return torch.ones((), dtype=acc, device=g.device), g
    t = w.to(acc).abs() + eta
    return t, t * g


def grad_sqnorm(bucket: Bucket) -> torch.Tensor:
    """``sum over the bucket of sum((T_w * g)^2)`` as a 0-d tensor on the bucket's device. Reads only."""
    acc = accumulate_dtype(bucket.dtype)
    total = torch.zeros((), dtype=acc, device=bucket.device)
    for w, g, adaptive, eta in zip(bucket.params, bucket.grads, bucket.adaptive, bucket.eta):
        _, tg = _scaled_grad(w, g, adaptive, eta)
        total = total + (tg * tg).sum()
    return total


def perturb_(bucket: Bucket, restore: str) -> None:
    """``w <- w + e`` for every tensor of the bucket; writes what the restore needs into ``bucket.buffers``.

    Mutates ``bucket.params`` and ``bucket.buffers`` in place; reads ``grads``, ``scales`` and ``finite``.
    """
    acc = accumulate_dtype(bucket.dtype)
    for w, g, buf, adaptive, eta, scale in zip(
        bucket.params, bucket.grads, bucket.buffers, bucket.adaptive, bucket.eta, bucket.scales
    ):
        t, tg = _scaled_grad(w, g, adaptive, eta)
        e = torch.where(bucket.finite, t * tg * scale, 0.0)
        w32 = w.to(acc)
        if restore == "copy":
            buf.copy_(w)
            w.copy_(w32 + e)
        else:
            buf.copy_(e)  # rounded to the storage dtype once
            w.copy_(w32 + buf.to(acc))


def restore_(bucket: Bucket, restore: str) -> None:
    """Undo :func:`perturb_`: ``w <- saved w`` (copy) or ``w <- w - e`` (subtract). Mutates ``bucket.params``."""
    acc = accumulate_dtype(bucket.dtype)
    for w, buf in zip(bucket.params, bucket.buffers):
        if restore == "copy":
            w.copy_(buf)
        else:
            w.copy_(w.to(acc) - buf.to(acc))


# --- LookSAM / GSAM: the decompositions' sums and combinations (fastasam.variants), tensor by tensor ----------------


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor | None:
    """sum_i <a_i, b_i>: products in the accumulate dtype, each tensor's sum in fp64, the sums added in order, on the
    first tensor's device (None: no tensors)."""
    total = None
    for x, y in zip(a, b, strict=True):
        acc = accumulate_dtype(x.dtype)
        part = (x.to(acc) * y.to(acc)).sum(dtype=torch.float64)
        total = part if total is None else total + part.to(total.device)
    return total


def axpby_(y: list[torch.Tensor], x: list[torch.Tensor], a: torch.Tensor | float, b: torch.Tensor | float) -> None:
    """y_i <- a * y_i + b * x_i: each product rounded, then the sum, in the accumulate dtype; stored in y_i's."""
    for yi, xi in zip(y, x, strict=True):
        acc = accumulate_dtype(yi.dtype)
        yi.copy_(a * yi.to(acc) + b * xi.to(acc))


# --- Momentum-SAM (fastasam.MSAM), tensor by tensor -------------------------------------------------------------------
#
# Between steps the weights sit at w~ = w - a * T^2 * m, with m the base optimizer's momentum (SGD's momentum buffer,
# Adam's exp_avg), T = |w| + eta for adaptive tensors (else 1) and a = rho / (||T * m|| + eps) the factor of the last
# perturbation (per param group; 0 before the first). A step, with the gradient g taken at w~:
#
#     w     = w~ + a * m        (moved back; adaptive tensors: the copy of w kept by the last perturbation)
#     SGD:    d = g + weight_decay * w~ ;  m = momentum * m + d ;  w = w - lr * m
#     Adam:   d = g (+ weight_decay * w~ with Adam's L2 decay) ;  m, v (, v_max) as torch.optim.Adam ;
#             w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps) ;  AdamW: w = w * (1 - lr * wd)
#     a     = rho / (||T * m|| + eps)        (the global norm of the new m; 0 when it is 0 or not finite)
#     w~    = w - a * T^2 * m
#
# the order of the authors' code (Becker et al. 2024): the weight decay of the SGD step uses w~ (the gradient's point),
# AdamW's decoupled decay comes after the update. Each stored value is rounded to the storage dtype once.


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(x.dtype)


def msam_update_(job) -> torch.Tensor:
    """Move back, then the base optimizer's step with ``job.grads``; returns the new ``sum((T * m)^2)`` (0-d, in the
    accumulate dtype). Mutates ``job.params`` and the state tensors ``job.s1``/``s2``/``s3``; reads ``job.factors``,
    ``job.buffers`` (the copy restore) and ``job.hyper`` (per param group: the fused update's hyper row, fp32)."""
    acc = accumulate_dtype(job.dtype)
    total = torch.zeros((), dtype=acc, device=job.device)
    for i, (w, g) in enumerate(zip(job.params, job.grads, strict=True)):
        gi = job.group[i]
        h = [torch.tensor(x, dtype=torch.float32).to(acc) for x in job.hyper[gi]]
        wt, m_old = w.to(acc), job.s1[i].to(acc)
        p = job.buffers[i].to(acc) if job.copy else _rounded(wt + job.factors[gi] * m_old, w.dtype)
        d = g.to(acc)
        if job.kind == "sgd":
            lr, momentum, one_minus_dampening, weight_decay, _, _, maximize = h[:7]
            if maximize != 0:
                d = -d
            if weight_decay != 0:
                d = d + weight_decay * wt
            m = _rounded(m_old * momentum + one_minus_dampening * d, w.dtype)
            w_new = p - lr * m
            job.s1[i].copy_(m)
            m_stored = m
        else:
            lerp, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size, bc2_sqrt, amsgrad, maximize = h
            if maximize != 0:
                d = -d
            if weight_decay != 0:
                d = d + weight_decay * wt
            m = m_old + lerp * (d - m_old) if lerp < 0.5 else d - (d - m_old) * (1 - lerp)
            v = job.s2[i].to(acc) * beta2 + one_minus_beta2 * d * d
            job.s1[i].copy_(m)
            job.s2[i].copy_(v)
            if amsgrad != 0:
                v = torch.maximum(job.s3[i].to(acc), v)
                job.s3[i].copy_(v)
            w_new = p - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
            if decay_factor != 1:
                w_new = w_new * decay_factor
            m_stored = job.s1[i].to(acc)
        w.copy_(w_new)
        t = w.to(acc).abs() + job.eta[i] if job.adaptive[i] else 1.0
        tm = t * m_stored
        total = total + (tm * tm).sum()
    return total


def msam_perturb_(job, total: torch.Tensor) -> None:
    """The new perturbation ``w~ = w - a * T^2 * m``, ``a = rho / (sqrt(total) + eps)`` per param group (0 when the
    norm is 0 or not finite), written into ``job.factors``. Mutates ``job.params``, ``job.factors`` and (copy
    restore) ``job.buffers``."""
    acc = accumulate_dtype(job.dtype)
    norm = total.to(acc).sqrt()
    ok = torch.isfinite(norm) & (norm > 0)
    inv = 1.0 / torch.where(ok, norm + job.eps, 1.0)
    for gi, rho in enumerate(job.rho):
        job.factors[gi] = torch.where(ok, inv * rho, 0.0)
    for i, w in enumerate(job.params):
        a = job.factors[job.group[i]]
        w32, m = w.to(acc), job.s1[i].to(acc)
        if job.copy:
            job.buffers[i].copy_(w)
        if job.adaptive[i]:
            t = w32.abs() + job.eta[i]
            e = t * (t * m) * a
        else:
            e = m * a
        w.copy_(w32 - e)


def msam_move_back_(job) -> None:
    """``w <- w~ + a * m`` (or the kept copy): the weights of the last step, before its perturbation (evaluation,
    checkpoints of the weights themselves). Mutates ``job.params``."""
    acc = accumulate_dtype(job.dtype)
    for i, w in enumerate(job.params):
        if job.copy:
            w.copy_(job.buffers[i])
        else:
            w.copy_(w.to(acc) + job.factors[job.group[i]] * job.s1[i].to(acc))
