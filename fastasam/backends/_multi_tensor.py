"""The host side of the multi-tensor backends (``triton``, ``cuda``): the device tables that describe a bucket to the
kernels (layout in ``_layout``), built when the step plan is built and reused every step, and the launches over them.

A backend supplies a :class:`Launcher` (which storage dtypes its kernels take, its chunk size, and how to bind one
launch); :class:`MultiTensorBackend` turns a :class:`~fastasam._plan.Bucket` into

* a :class:`PerturbRunner` (first step and plain restore): one launch each for the squared norm, the perturbation and
  the restore. Tensors the kernels cannot treat as one flat run of memory like their parameter, or whose dtype the
  kernels lack, go to ``foreach`` inside the same step;
* an :class:`UpdateRunner` (second step): one launch that restores and applies ``torch.optim.SGD`` / ``Adam`` /
  ``AdamW``'s update to every tensor that qualifies, and one restore launch for the perturbed tensors that do not
  (the step plan then has the base optimizer step just those).

Launches are bound once with their arguments (device tensors the plan owns, whose addresses never change while the
plan lives), so a warm step calls them with nothing to compute. Tables are updated in place (``copy_``): only what
changed is uploaded (the gradient addresses when a gradient moved, ``opts`` when rho or eta changed, ``hyper`` when a
hyper-parameter changed). ``torch.compile`` does not trace this module (it reads addresses); a compiled training
step runs it between its graphs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .._plan import Bucket, accumulate_dtype
from . import _layout as L
from . import foreach
from ._updates import FusedUpdate, flat_like


class Launcher(Protocol):
    """What a backend provides: the storage dtypes its kernels take (``fused_dtypes``: of the fused updates), the
    chunk size (elements per program / block), and ``bind``, which returns a function that launches ``kernel`` over
    ``count`` chunks with the runtime tensor arguments ``tensors`` (the kernel's arguments before its sizes and
    compile-time options); ``aligned``: some row of the table has every column this kernel reads 16-byte aligned
    (``_aligned``; each row's own flags then choose vector or element loads); ``copy``: the restore mode, ``mode``:
    ``combine``'s ``_layout.COMBINE_*``."""

    dtypes: frozenset[torch.dtype]
    fused_dtypes: frozenset[torch.dtype]
    chunk: int

    def bind(self, kernel: str, count: int, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, aligned: bool,
             copy: bool, mode: int = 0) -> Callable[[], None]: ...


_POINTER_COLS = list(L.POINTER_COLS)
_ALIGN_BITS = torch.tensor([L.aligned_mask(c) for c in L.POINTER_COLS], dtype=torch.int64)
_ALIGN_ALL = L.aligned_mask(*L.POINTER_COLS)


def _mark_aligned(tab: torch.Tensor) -> torch.Tensor:
    """Set the alignment bits of every row's flags (``_layout.ALIGN_SHIFT``) from the addresses in ``tab`` (a host
    rows table, changed in place and returned): each address column 16-byte aligned gets its bit, so each kernel
    decides per row whether to use vector loads. Called wherever addresses or flags are written."""
    if tab.numel():
        bits = (((tab[:, _POINTER_COLS] % 16) == 0).to(torch.int64) * _ALIGN_BITS).sum(1)
        tab[:, L.COL_FLAGS] = (tab[:, L.COL_FLAGS] & ~_ALIGN_ALL) | bits
    return tab


def _aligned(rows: torch.Tensor, columns: Sequence[int]) -> bool:
    """Some row of the host table ``rows`` (alignment bits set by ``_mark_aligned``) has every address in these
    columns 16-byte aligned: the launch of the kernel reading them compiles its vector path (``ALIGNED``), which each
    row then takes or not by its own bits."""
    mask = L.aligned_mask(*columns)
    return bool(((rows[:, L.COL_FLAGS] & mask) == mask).any())


def _chunk_list(numels: Sequence[int], rows: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    return [(r, k) for r in rows for k in range(math.ceil(numels[r] / chunk))]


def _rows_table(columns: Sequence[Sequence[torch.Tensor | None]], numels: Sequence[int],
                flags: Sequence[int]) -> torch.Tensor:
    """The host ``rows`` table: ``columns[c][r]`` is the tensor of column ``c`` in row ``r`` (None = 0)."""
    tab = torch.zeros((len(numels), L.NCOL), dtype=torch.int64)
    if len(numels) and columns:
        ptrs = [[0 if t is None else t.data_ptr() for t in col] for col in columns]
        tab[:, : len(columns)] = torch.tensor(ptrs, dtype=torch.int64).t()
    if len(numels):
        tab[:, L.COL_NUMEL] = torch.tensor(numels, dtype=torch.int64)
        tab[:, L.COL_FLAGS] = torch.tensor(flags, dtype=torch.int64)
    return _mark_aligned(tab)


def _write_kept(tab: torch.Tensor, rows_d: torch.Tensor, bucket: Bucket, rows: Sequence[int], members: Sequence[int],
                kept) -> bool:
    """LookSAM's / GSAM's kept buffers into the K column of a runner's table: ``kept[param]`` for the bucket tensor of
    each row (``rows``: bucket indices), written into the host table ``tab`` and uploaded to ``rows_d``. False,
    nothing written, when one of ``members`` (the runner's tensors, the empty ones included) has no kept buffer of
    its dtype laid out like it."""
    bufs = [kept.get(bucket.keys[i]) for i in rows]
    if any(k is None or k.dtype != bucket.params[i].dtype or not flat_like(k, bucket.params[i])
           for k, i in zip(bufs, rows, strict=True)) or any(bucket.keys[i] not in kept for i in members):
        return False
    if bufs:
        tab[:, L.COL_K] = torch.tensor([k.data_ptr() for k in bufs], dtype=torch.int64)
        _mark_aligned(tab)
        _upload(rows_d, tab, "the variant's kept buffers")
    return True


class MultiTensorBackend:
    """The backend interface over a :class:`Launcher`: ``prepare(bucket, restore, eps)`` gives the bucket's
    :class:`PerturbRunner`."""

    traceable = False

    def __init__(self, name: str, launcher: Launcher) -> None:
        self.name, self.launcher = name, launcher

    def prepare(self, bucket: Bucket, restore: str, eps: float) -> PerturbRunner:
        return PerturbRunner(self, bucket, restore, eps)


class PerturbRunner:
    """The first step of one bucket on the kernels: norm, perturbation, and the restore when not fused.

    ``kernel_index``: the bucket's tensors the kernels serve (their addresses are in ``rows``; the step plan's watch
    checks them each step); ``reasons[i]``: why tensor ``i`` went to ``foreach`` instead (None for kernel tensors).
    ``grad_target``: the bucket whose ``grads`` the step plan sets each step (the foreach part; for DTensor shards the
    whole bucket, with local gradients, which this runner then checks itself)."""

    needs_scales: bool

    def __init__(self, backend: MultiTensorBackend, bucket: Bucket, restore: str, eps: float) -> None:
        launcher = backend.launcher
        self.name, self.launcher, self.bucket, self.restore_mode = backend.name, launcher, bucket, restore
        self.copy = restore == "copy"
        self.reasons: list[str | None] = []
        for p, g in zip(bucket.params, bucket.grads, strict=True):
            if p.dtype not in launcher.dtypes:
                reason = f"no {backend.name} kernel for {str(p.dtype).replace('torch.', '')}"
            elif not flat_like(p, p):
                reason = "the parameter is not dense in memory"
            elif not flat_like(g, p):
                reason = "its gradient is laid out unlike the parameter"
            else:
                reason = None
            self.reasons.append(reason)
        self.kernel_index = [i for i, r in enumerate(self.reasons) if r is None]
        self.self_check = bucket.dtensor_shards
        rest = [r is not None for r in self.reasons]
        self.rest = bucket.subset(rest) if any(rest) else None
        self.rest_head = self.rest.head(self.rest.n_perturbed) if self.rest is not None else None
        self.needs_scales = bool(self.rest_head and self.rest_head.params)
        self.grad_target = bucket if self.self_check else self.rest
        acc = accumulate_dtype(bucket.dtype)
        dev = bucket.device
        # the rows with elements, perturbed ones first (the bucket's order)
        self.rows = [i for i in self.kernel_index if bucket.params[i].numel() > 0]
        self.n_perturbed_rows = sum(i < bucket.n_perturbed for i in self.rows)
        numels = [bucket.params[i].numel() for i in self.rows]
        groups = sorted({bucket.group[i] for i in self.rows})
        self.slot = {g: s for s, g in enumerate(groups)}
        chunks = _chunk_list(numels, range(len(self.rows)), launcher.chunk)
        self.n_chunks = len(chunks)
        self.n_perturb_chunks = len(_chunk_list(numels, range(self.n_perturbed_rows), launcher.chunk))
        self.numels = numels
        self.rows_d = self._rows_host().to(dev)
        self.chunks_d = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2).to(dev)
        self.opts_d = torch.zeros((max(1, len(groups)), L.NOPT), dtype=acc, device=dev)
        self.eps = eps
        self.set_options()
        self.partials = torch.empty(max(1, self.n_chunks), dtype=acc, device=dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self.share = torch.zeros((), dtype=acc, device=dev)
        self.sq_in = torch.zeros((), dtype=acc, device=dev)
        self._launches: tuple | None = None
        self._keep = None  # LookSAM's / GSAM's copy of the gradients (bind_keep)

    # --- built once ----------------------------------------------------------------------------------------------

    def _rows_host(self) -> torch.Tensor:
        b = self.bucket
        ws = [b.params[i] for i in self.rows]
        gs = [b.grads[i] for i in self.rows]
        bs = [b.buffers[i] if i < b.n_perturbed else None for i in self.rows]
        flags = [self.slot[b.group[i]] << L.OPT_SHIFT for i in self.rows]
        tab = self._tab = _rows_table((ws, gs, bs), [t.numel() for t in ws], flags)
        # each kernel compiles its vector path where some row has the columns it reads aligned
        self.aligned = {"sqnorm": _aligned(tab, (L.COL_W, L.COL_G)),
                        "perturb": _aligned(tab, (L.COL_W, L.COL_G, L.COL_B)),
                        "restore": _aligned(tab, (L.COL_W, L.COL_B))}
        self.grad_ptrs = tab[:, L.COL_G].tolist()
        return tab

    def set_options(self) -> None:
        """Upload ``opts`` (eta, rho, adaptive, eps per group) from the bucket's current options (and have the
        foreach part re-read them)."""
        b = self.bucket
        if self.rest is not None:  # in place: the step plan hands this bucket its gradients each step
            keep = [r is not None for r in self.reasons]
            for name in ("adaptive", "eta", "rho"):
                setattr(self.rest, name, [x for x, k in zip(getattr(b, name), keep, strict=True) if k])
            self.rest.layout = None
            self.rest_head = self.rest.head(self.rest.n_perturbed)
        host = [[0.0] * L.NOPT for _ in range(self.opts_d.shape[0])]
        for i in self.rows:
            row = host[self.slot[b.group[i]]]
            row[L.OPT_ETA], row[L.OPT_RHO], row[L.OPT_ADAPTIVE], row[L.OPT_EPS] = (
                b.eta[i], b.rho[i], float(b.adaptive[i]), self.eps)
        _upload(self.opts_d, torch.tensor(host, dtype=self.opts_d.dtype), "rho, eta or adaptive option")

    def refresh_addresses(self) -> None:
        """The gradients moved (same shapes, dtypes and layouts): rewrite ``rows`` in place."""
        tab = self._rows_host()
        _upload(self.rows_d, tab, "gradient addresses")
        self._launches = self._keep = None  # the alignment may have changed

    def bind(self, share_is_total: bool) -> None:
        """Bind the launches. ``share_is_total``: this bucket's share of the squared norm is the whole norm, so the
        perturbation reads it where the norm kernel wrote it."""
        if share_is_total:
            self.sq_in = self.share
        bind, dtype, aligned = self.launcher.bind, self.bucket.dtype, self.aligned
        norm = None
        if self.n_chunks:
            norm = bind("sqnorm", self.n_chunks, (self.rows_d, self.chunks_d, self.opts_d, self.partials, self.counter,
                                                  self.share), dtype, aligned["sqnorm"], self.copy)
        perturb = restore = None
        if self.n_perturb_chunks:
            perturb = bind("perturb", self.n_perturb_chunks, (self.rows_d, self.chunks_d, self.opts_d, self.sq_in),
                           dtype, aligned["perturb"], self.copy)
            restore = bind("restore", self.n_perturb_chunks, (self.rows_d, self.chunks_d), dtype, aligned["restore"],
                           self.copy)
        self._launches = (norm, perturb, restore, share_is_total)

    def bind_keep(self, kept) -> bool:
        """LookSAM's / GSAM's copy of the gradients (``combine`` in mode ``COMBINE_KEEP``: K <- G) over this runner's
        tables, the K column from ``kept[param]``; False (nothing bound) when a kernel tensor has no kept buffer laid
        out like it."""
        b = self.bucket
        if not _write_kept(self._tab, self.rows_d, b, self.rows, self.kernel_index, kept):
            return False
        self._keep = None
        if not self.n_chunks:
            return True
        dev = self.rows_d.device
        unused = torch.zeros(3, dtype=torch.float64, device=dev)  # KEEP reads no sums and no alpha
        self._keep = self.launcher.bind("combine", self.n_chunks, (self.rows_d, self.chunks_d, unused, unused[:1]),
                                        b.dtype, _aligned(self._tab, (L.COL_G, L.COL_K)), False,
                                        mode=L.COMBINE_KEEP)
        return True

    # --- run every step ------------------------------------------------------------------------------------------

    def keep(self) -> None:
        if self._keep is not None:
            self._keep()

    def _check_local_grads(self) -> None:
        """DTensor shards: the step plan's watch cannot see local gradients; compare them here and rewrite ``rows``
        if one moved or changed layout."""
        b = self.bucket
        if [b.grads[i].data_ptr() for i in self.rows] != self.grad_ptrs or not all(
                flat_like(b.grads[i], b.params[i]) for i in self.kernel_index):
            if not all(flat_like(b.grads[i], b.params[i]) for i in self.kernel_index):
                raise RuntimeError("fastasam: a DTensor gradient changed its layout; rebuild the optimizer")
            self.refresh_addresses()
        if self.rest is not None:
            self.rest.grads = [g for g, r in zip(b.grads, self.reasons) if r is not None]

    def sqnorm(self) -> torch.Tensor:
        if self.self_check:
            self._check_local_grads()
        if self._launches is None:
            self.bind(self.sq_in is self.share)
        norm = self._launches[0]
        if norm is not None:
            norm()
        if self.rest is not None:
            return self.share + foreach.grad_sqnorm(self.rest)
        return self.share

    def perturb(self, total: torch.Tensor, scales: list[torch.Tensor] | None, finite: torch.Tensor | None) -> None:
        _, perturb, _, is_total = self._launches
        if perturb is not None:
            if not is_total:
                self.sq_in.copy_(total)
            perturb()
        head = self.rest_head
        if head is not None and head.params:
            head.grads = self.rest.grads[: head.n_perturbed]
            head.scales = list(map(scales.__getitem__, head.group))
            head.finite = finite
            foreach.perturb_(head, self.restore_mode)
            head.grads, head.scales = [], []

    def restore(self) -> None:
        restore = self._launches[2]
        if restore is not None:
            restore()
        self.restore_rest()

    def restore_rest(self) -> None:
        if self.rest_head is not None and self.rest_head.params:
            foreach.restore_(self.rest_head, self.restore_mode)

    def release(self) -> None:
        """Drop references to this step's gradients (the tables keep addresses, not tensors)."""
        self.bucket.grads = []
        if self.rest is not None:
            self.rest.grads = []


class UpdateRunner:
    """The second step of one bucket: restore + the base optimizer's update fused for the tensors that qualify
    (``fused``: bucket indices), a plain restore for the other perturbed kernel tensors; the update plan
    (``fastasam._step_plan.UpdatePlan.outcomes``) says what happens to each bucket tensor and why."""

    def __init__(self, phase1: PerturbRunner, base: torch.optim.Optimizer, update: FusedUpdate,
                 owner: dict[int, int], restore_only: dict[int, str], base_step: dict[int, str]) -> None:
        b = phase1.bucket
        self.phase1, self.base, self.update = phase1, base, update
        fused_dtype = b.dtype in phase1.launcher.fused_dtypes
        self.fused: list[int] = []
        columns: list[list] = []
        fresh: list[bool] = []
        by_group: dict[int, list[int]] = {}
        group_reasons: dict[int, str | None] = {}
        for i in phase1.kernel_index:
            if i >= b.n_perturbed or i in restore_only or i in base_step:
                continue
            key = b.keys[i]
            gi = owner[id(key)]
            group = base.param_groups[gi]
            if gi not in group_reasons:
                group_reasons[gi] = update.group_reason(group)
            reason = group_reasons[gi]
            if reason is None and not fused_dtype:
                reason = f"no fused {phase1.name} update for {str(b.dtype).replace('torch.', '')}"
            if reason is None:
                reason = gradient_mismatch(key.grad, b.params[i], "second-pass ")
            if reason is None and not isinstance(base.state[key], dict):
                reason = f"its state is a {type(base.state[key]).__name__}, not a dict"
            if reason is None:
                cols = update.state_columns(b.params[i], base.state[key], group)
                if isinstance(cols, str):
                    reason = cols
                else:
                    self.fused.append(i)
                    columns.append(cols[0])
                    fresh.append(cols[1])
                    by_group.setdefault(gi, []).append(len(self.fused) - 1)
            if reason is not None:
                base_step[i] = reason
        self._steps: dict[int, torch.Tensor] = {}
        if update.counts_steps:  # Adam: one bias correction per group, so one step count per group
            for gi, members in list(by_group.items()):
                states = [base.state[b.keys[self.fused[m]]] for m in members]
                values = [float(st["step"]) for st in states]
                common = Counter(values).most_common(1)[0][0]
                odd = {m for m, v in zip(members, values) if v != common}
                for m in odd:
                    base_step[self.fused[m]] = "its Adam step count differs from the rest of its param group"
                by_group[gi] = [m for m in members if m not in odd]
                keep = [st for m, st in zip(members, states) if m not in odd]
                if keep:
                    self._steps[gi] = update.steps_for(keep)
            kept = sorted(m for ms in by_group.values() for m in ms)
            self.fused = [self.fused[m] for m in kept]
            columns = [columns[m] for m in kept]
            fresh = [fresh[m] for m in kept]
        groups = sorted({owner[id(b.keys[i])] for i in self.fused})
        self.slot = {g: s for s, g in enumerate(groups)}
        self.groups = groups
        dev = b.device
        # the fused rows table: W, second-pass G, B, state S1..S3
        fused_rows = [i for i in self.fused if b.params[i].numel() > 0]
        pos = {i: k for k, i in enumerate(self.fused)}
        self.flags = [(self.slot[owner[id(b.keys[i])]] << L.HYPER_SHIFT) | (L.FLAG_FRESH_STATE if fresh[pos[i]] else 0)
                      for i in fused_rows]
        self.fused_rows = fused_rows
        self.numels = [b.params[i].numel() for i in fused_rows]
        tab = self._tab = _rows_table(
            [[b.params[i] for i in fused_rows], [b.keys[i].grad for i in fused_rows],
             [b.buffers[i] for i in fused_rows], *([columns[pos[i]][k] for i in fused_rows] for k in range(3))],
            self.numels, self.flags)
        # the state tensors of each fused tensor (the plan's watch confirms them every step); the optimizer state the
        # table points into stays alive with the plan, whatever happens to the state dict
        self.fused_state = [[t for t in cols if t is not None] for cols in columns]
        self.rows_d = tab.to(dev)
        chunks = _chunk_list(self.numels, range(len(fused_rows)), phase1.launcher.chunk)
        self.chunks_d = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2).to(dev)
        self.hyper_d = torch.zeros((max(1, len(groups)), L.NHYPER), dtype=torch.float32, device=dev)
        self._uploaded = False
        self.counts_steps = bool(self._steps)  # Adam: a step count to check and count each step
        # the perturbed kernel rows that are not fused: a restore over their chunks of the first step's table
        row_of = {i: r for r, i in enumerate(phase1.rows)}
        fused_set = set(self.fused)
        plain = [row_of[i] for i in phase1.rows if i < b.n_perturbed and i not in fused_set]
        restore_chunks = _chunk_list(phase1.numels, plain, phase1.launcher.chunk)
        self.restore_chunks_d = torch.tensor(restore_chunks, dtype=torch.int32).reshape(-1, 2).to(dev)
        bind = phase1.launcher.bind
        self.n_fused_chunks = len(chunks)
        # the fused update without GSAM's direction reads no sums and no alpha (bind_variant binds those)
        self._no_sums = torch.zeros(3, dtype=torch.float64, device=dev)
        self._no_alpha = torch.zeros(1, dtype=torch.float64, device=dev)
        self._dots = self._combine = self._fused_dir = None  # LookSAM's / GSAM's launches (bind_variant)
        self._bind_fused()
        self._restore = bind("restore", len(restore_chunks), (phase1.rows_d, self.restore_chunks_d), b.dtype,
                             phase1.aligned["restore"], phase1.copy) if restore_chunks else None
        self._fresh = any(fresh)

    def _bind_fused(self) -> None:
        used = (L.COL_W, L.COL_G, L.COL_B, L.COL_S1, L.COL_S2, L.COL_S3)
        self._fused = None
        self._dots = self._combine = self._fused_dir = None  # the variants' launches: bound again when next asked for
        if self.n_fused_chunks:
            self._fused = self.phase1.launcher.bind(self.update.kernel, self.n_fused_chunks,
                                                    (self.rows_d, self.chunks_d, self.hyper_d, self._no_sums,
                                                     self._no_alpha), self.phase1.bucket.dtype,
                                                    _aligned(self._tab, used), self.phase1.copy)

    def bind_variant(self, kept, out: torch.Tensor, sums: torch.Tensor, alpha: torch.Tensor, mode: int) -> bool:
        """LookSAM's / GSAM's launches over this runner's fused tables: the K column from ``kept[param]`` (False,
        nothing bound, when a fused tensor has no kept buffer laid out like it), ``dots`` into ``out``; for ``mode``
        ``COMBINE_GSAM`` the fused update along GSAM's direction (from ``sums``, ``alpha``), else ``combine`` in that
        mode (writing K) before the plain fused update."""
        b = self.phase1.bucket
        if not _write_kept(self._tab, self.rows_d, b, self.fused_rows, self.fused, kept):
            return False
        self._dots = self._combine = self._fused_dir = None
        n, dtype, bind = self.n_fused_chunks, b.dtype, self.phase1.launcher.bind
        if not n:
            out.zero_()
            return True
        pair = _aligned(self._tab, (L.COL_G, L.COL_K))
        dev = self.rows_d.device
        partials = torch.empty(3 * n, dtype=torch.float64, device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self._dots = bind("dots", n, (self.rows_d, self.chunks_d, partials, counter, out), dtype, pair, False)
        if mode == L.COMBINE_GSAM:
            used = (L.COL_W, L.COL_G, L.COL_B, L.COL_S1, L.COL_S2, L.COL_S3, L.COL_K)
            self._fused_dir = bind(self.update.kernel, n, (self.rows_d, self.chunks_d, self.hyper_d, sums, alpha),
                                   dtype, _aligned(self._tab, used), self.phase1.copy, mode=L.COMBINE_GSAM)
        else:
            self._combine = bind("combine", n, (self.rows_d, self.chunks_d, sums, alpha), dtype, pair, False,
                                 mode=mode)
        return True

    def dots(self) -> None:
        if self._dots is not None:
            self._dots()

    def combine(self) -> None:
        if self._combine is not None:
            self._combine()

    def refresh_addresses(self) -> bool:
        """The second-pass gradients moved: rewrite their column in place, if they are still gradients of their
        parameters (shape, dtype, device) laid out like them (else False: rebuild)."""
        b = self.phase1.bucket
        grads = [b.keys[i].grad for i in self.fused_rows]
        if any(gradient_mismatch(g, b.params[i]) for g, i in zip(grads, self.fused_rows, strict=True)):
            return False
        if grads:
            self._tab[:, L.COL_G] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
            _mark_aligned(self._tab)
            _upload(self.rows_d, self._tab.clone(), "gradient addresses")
        self._bind_fused()
        return True

    @property
    def fused_keys(self) -> list[torch.Tensor]:
        return [self.phase1.bucket.keys[i] for i in self.fused]

    def steps_intact(self) -> bool:
        """Adam: each group's fused tensors still share one step count (nobody stepped some of them)."""
        for counter in self._steps.values():
            lo, hi = torch.aminmax(counter)
            if lo != hi:
                return False
        return True

    def upload(self, changed: bool) -> None:
        """Count the step (Adam) and upload ``hyper`` when the base optimizer's options ``changed`` (and the first
        time; Adam: every step, its bias corrections change)."""
        if self._uploaded and not changed and not self._steps:
            return
        self._uploaded = True
        groups = self.base.param_groups
        steps = []
        for gi in self.groups:
            counter = self._steps.get(gi)
            if counter is not None:
                counter.add_(1)  # torch.optim.Adam counts the step before its update
            steps.append(0.0 if counter is None else float(counter[0]))
        host = [self.update.hyper_row(groups[gi], s) for gi, s in zip(self.groups, steps, strict=True)]
        if host:
            cuda = self.hyper_d.is_cuda
            _upload(self.hyper_d, torch.tensor(host, dtype=torch.float32, pin_memory=cuda), "hyper-parameters", cuda)

    def run(self, direction: bool = False) -> None:
        """The fused restore + update (``direction``: along GSAM's direction, bound by ``bind_variant``), the plain
        restore of the other perturbed kernel tensors, the foreach part's restore."""
        fused = self._fused_dir if direction else self._fused
        if fused is not None:
            fused()
        if self._restore is not None:
            self._restore()
        self.phase1.restore_rest()
        if self._fresh:  # torch.optim.SGD's first step made the buffers; from now on they hold momentum
            self._fresh = False
            self.flags = [f & ~L.FLAG_FRESH_STATE for f in self.flags]
            if self.flags:
                self._tab[:, L.COL_FLAGS] = torch.tensor(self.flags, dtype=torch.int64)
                _mark_aligned(self._tab)
                _upload(self.rows_d, self._tab.clone(), "optimizer state")


def gradient_mismatch(g: torch.Tensor | None, p: torch.Tensor, which: str = "") -> str | None:
    """Why the kernels cannot read ``g`` as the gradient of ``p`` (None: they can): it must be a dense tensor of
    ``p``'s shape, dtype and device, laid out like ``p``."""
    if g is None:
        return f"no {which}gradient"
    if g.layout != torch.strided or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        return f"its {which}gradient is not a dense tensor of the parameter's shape, dtype and device"
    if not flat_like(g, p):
        return f"its {which}gradient is laid out unlike the parameter"
    return None


def _upload(dst: torch.Tensor, host: torch.Tensor, what: str, pinned: bool = False) -> None:
    """Copy a host table into its device tensor in place (its address, bound into the launches, stays).

    To a CUDA tensor the copy is asynchronous from page-locked memory: ``host`` itself when the caller made it
    pinned (``pinned``), else a pinned copy of it. The pinned block comes from PyTorch's caching host allocator,
    which does not hand it out again before the copy has run, so the caller may change ``host`` right after (a copy
    from pageable memory would make the host wait for the device instead)."""
    if dst.device.type != "cuda":
        dst.copy_(host)
        return
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fastasam: the {what} changed while a CUDA graph is being captured; a graph replays the values it was "
            "captured with. Run one eager step with the new values before capturing, and capture again after "
            "changing them."
        )
    dst.copy_(host if pinned else host.pin_memory(), non_blocking=True)
