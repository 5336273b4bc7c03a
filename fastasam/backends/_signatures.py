"""Every multi-tensor kernel's arguments, in one table, and each kernel backend's signature derived from it.

A kernel (``KERNELS``) takes tensors (``Tensor``: the tables of ``_layout`` and the launch's device scalars, in the
order the host passes them to ``Launcher.bind``) and scalars: ``count`` (the chunks to launch), ``chunk_size``,
``dtype`` (the storage dtype), ``copy`` (the restore mode, for the kernels that restore) and ``mode`` (``combine``'s
``_layout.COMBINE_*``; the fused updates' direction, 0 or ``COMBINE_GSAM``). Each implementation lays them out by one
rule (``SIGNATURES[backend][kernel]``, a tuple of ``Param``):

``schema``  the ``torch.library`` ops ``torch.ops.fastasam.*`` (``csrc/binding.cpp``; the ``cuda`` backend): the
            tensors, then ``count, chunk_size, dtype``, then ``copy`` and ``mode`` where the kernel takes them;
``c``       the C interface of the CUDA kernels (``csrc/multi_tensor.h``; ``cuda_shim`` calls it through ctypes):
            ``dtype``, the tensors the kernel reads, ``count, chunk_size``, the tensors it writes (the reductions'
            results and scratch), ``copy``, ``mode``, the stream;
``cpu``     ``fastasam._cpu`` (``csrc/cpu_kernels.cpp``, ``csrc/cpu_loops.h``; the ``cpu`` backend): the ``c``
            order with every tensor an int64 address, without the GPU reductions' cross-block scratch (``partials``,
            ``counter``: one call adds its chunks' partial sums itself) and without the stream;
``triton``  the Triton kernels (``kernels/multi_tensor.py``): the tensors, ``n_programs`` (= count) for the
            reductions, then the compile-time options ``DTYPE, ACC, CHUNK, BLOCK, ALIGNED``, ``COPY`` and
            ``MODE`` / ``DIRECTION``.

A backend binds a launch with ``arguments(SIGNATURES[backend][kernel], kernel, tensors, **values)``, once per plan
(never per step). ``tests/test_signatures.py`` parses every source that spells a signature (the C header and its
definitions, the op schemas, the C++ functions behind them, the CPU module's functions, the Triton kernels, the ops'
fakes) and compares it with these. The fused updates' kernels are the classes' of ``_updates`` (``FUSED_UPDATES``);
run as a script (``csrc/check.sh``: ``python3 fastasam/backends/_signatures.py cuda-entries`` prints the CUDA kernels'
entry points), this module needs no torch: it imports ``_layout`` alone and reads that list from ``csrc/elementwise.h``
(``FA_FUSED_UPDATES``), which the test compares with the classes'.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path


def c_update_kernels(elementwise_h: str) -> tuple[str, ...]:
    """The fused updates' kernels that ``csrc/elementwise.h``'s ``FA_FUSED_UPDATES`` lists (the text given)."""
    m = re.search(r"#define FA_FUSED_UPDATES\(X\)((?:[^\n]*\\\n)*[^\n]*)", elementwise_h)
    return tuple(re.findall(r"\bX\((\w+),", m.group(1))) if m else ()


if __package__:
    from . import _layout as L
    from ._updates import FUSED_UPDATES

    UPDATE_KERNELS = tuple(u.kernel for u in FUSED_UPDATES)  # the classes' (tests/test_signatures.py: = the C list)
else:  # run as a script (csrc/check.sh, without torch): _layout.py sits beside this file; the list from the C header
    # (csrc/ is beside fastasam/ in a checkout, inside it where installed)
    import _layout as L

    _here = Path(__file__).resolve().parent
    _header = next(p for p in (_here.parents[1] / "csrc/elementwise.h", _here.parent / "csrc/elementwise.h")
                   if p.exists())
    UPDATE_KERNELS = c_update_kernels(_header.read_text())


@dataclass(frozen=True)
class Tensor:
    """A tensor argument. ``dtype``: ``int64``, ``int32``, ``float32``, ``float64``, or ``acc`` (the accumulate dtype:
    fp32, fp64 for fp64 storage; the CUDA kernels take fp32 only). ``written``: the kernel writes the tensor itself
    (every kernel writes through the addresses in ``rows``, which the op schemas mark as mutated). ``scratch``: the
    GPU reductions' cross-block state (per-chunk partial sums, the last-block counter)."""

    name: str
    dtype: str
    written: bool = False
    scratch: bool = False


@dataclass(frozen=True)
class Kernel:
    """``mode``: the compile-time name of the kernel's mode in Triton (``MODE``, ``DIRECTION``), None without one;
    ``modes``: its values, named (the variants ``kernels/compile_check.py`` compiles); ``mode_entries``: the CUDA
    source has one ``__global__`` kernel per mode (``<name>_kernel_<mode name>``) instead of one taking the mode."""

    name: str
    tensors: tuple[Tensor, ...]
    copy: bool = True
    mode: str | None = None
    modes: tuple[tuple[str, int], ...] = ()
    mode_entries: bool = False

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def reduces(self) -> bool:
        """A sum over all chunks (per-chunk partials, the last block adds them): Triton takes the chunk count."""
        return any(t.scratch for t in self.tensors)

    @property
    def cuda_entries(self) -> tuple[str, ...]:
        """The ``__global__`` kernels of ``csrc/multi_tensor.cu`` that run it."""
        if self.mode_entries:
            return tuple(f"{self.name}_kernel_{label}" for label, _ in self.modes)
        return (f"{self.name}_kernel",)


@dataclass(frozen=True)
class Param:
    """One parameter of one implementation: ``name`` as its source spells it, ``value`` the launch value it takes
    (a tensor's name, a scalar's, or a backend's own: ``stream``, ``acc``, ``block``, ``aligned``) and ``type`` as
    the source spells it (C/C++ type; schema type; Triton type, ``*acc`` for an ``acc`` tensor)."""

    name: str
    value: str
    type: str


_ROWS, _CHUNKS = Tensor("rows", "int64"), Tensor("chunks", "int32")
_OPTS, _HYPER = Tensor("opts", "acc"), Tensor("hyper", "float32")
_SUMS, _ALPHA = Tensor("sums", "float64"), Tensor("alpha", "float64")
_DIRECTIONS = (("", 0), ("gsam", L.COMBINE_GSAM))
_UPDATE = (_ROWS, _CHUNKS, _HYPER, _SUMS, _ALPHA)
_COUNTER = Tensor("counter", "int32", written=True, scratch=True)
_FACTORS = Tensor("factors", "acc")  # MSAM: each param group's factor of the perturbation in place

KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("sqnorm", (_ROWS, _CHUNKS, _OPTS, Tensor("partials", "acc", written=True, scratch=True), _COUNTER,
                      Tensor("out", "acc", written=True)), copy=False),
    Kernel("perturb", (_ROWS, _CHUNKS, _OPTS, Tensor("sqnorm", "acc"))),
    Kernel("restore", (_ROWS, _CHUNKS)),
    *(Kernel(name, _UPDATE, mode="DIRECTION", modes=_DIRECTIONS) for name in UPDATE_KERNELS),
    Kernel("dots", (_ROWS, _CHUNKS, Tensor("partials", "float64", written=True, scratch=True), _COUNTER,
                    Tensor("out", "float64", written=True)), copy=False),
    Kernel("combine", (_ROWS, _CHUNKS, _SUMS, _ALPHA), copy=False, mode="MODE", mode_entries=True,
           modes=(("keep", L.COMBINE_KEEP), ("look_full", L.COMBINE_LOOK_FULL), ("look_one", L.COMBINE_LOOK_ONE),
                  ("gsam", L.COMBINE_GSAM))),
    # Momentum-SAM (fastasam.MSAM): move back + the base optimizer's update + the new norm's partials; perturb
    *(Kernel(name, (_ROWS, _CHUNKS, _HYPER, _OPTS, _FACTORS, Tensor("partials", "acc", written=True, scratch=True),
                    _COUNTER, Tensor("out", "acc", written=True))) for name in ("msam_sgd", "msam_adam")),
    Kernel("msam_perturb", (_ROWS, _CHUNKS, _OPTS, Tensor("sqnorm", "acc"), Tensor("factors", "acc", written=True))),
)}

_C_TYPE = {"int64": "int64_t", "int32": "int32_t", "float32": "float", "float64": "double", "acc": "float"}
_TRITON_TYPE = {"int64": "*i64", "int32": "*i32", "float32": "*fp32", "float64": "*fp64", "acc": "*acc"}


def _options(k: Kernel, copy: str, mode: str) -> list[Param]:
    out = [Param("copy", "copy", copy)] if k.copy else []
    return out + ([Param("mode", "mode", mode)] if k.mode else [])


def _schema(k: Kernel) -> tuple[Param, ...]:
    params, alias = [], iter("abcdefgh")
    for i, t in enumerate(k.tensors):
        params.append(Param(t.name, t.name, f"Tensor({next(alias)}!)" if i == 0 or t.written else "Tensor"))
    params += [Param("count", "count", "int"), Param("chunk_size", "chunk_size", "int"), Param("dtype", "dtype", "int")]
    return tuple(params + _options(k, "bool", "int"))


def _c(k: Kernel) -> tuple[Param, ...]:
    def ptr(t: Tensor) -> Param:
        return Param(t.name, t.name, f"{'' if t.written else 'const '}{_C_TYPE[t.dtype]}*")

    params = [Param("dtype", "dtype", "int"), *(ptr(t) for t in k.tensors if not t.written),
              Param("count", "count", "int"), Param("chunk_size", "chunk_size", "int64_t"),
              *(ptr(t) for t in k.tensors if t.written)]
    return tuple(params + _options(k, "int", "int") + [Param("stream", "stream", "cudaStream_t")])


def _cpu(k: Kernel) -> tuple[Param, ...]:
    params = [Param("dtype", "dtype", "int"), *(Param(t.name, t.name, "int64_t") for t in k.tensors if not t.written),
              Param("count", "count", "int64_t"), Param("chunk_size", "chunk_size", "int64_t"),
              *(Param(t.name, t.name, "int64_t") for t in k.tensors if t.written and not t.scratch)]
    return tuple(params + _options(k, "bool", "int"))


def _triton(k: Kernel) -> tuple[Param, ...]:
    params = [Param(t.name, t.name, _TRITON_TYPE[t.dtype]) for t in k.tensors]
    if k.reduces:
        params.append(Param("n_programs", "count", "i32"))
    params += [Param(n, v, "constexpr") for n, v in (("DTYPE", "dtype"), ("ACC", "acc"), ("CHUNK", "chunk_size"),
                                                      ("BLOCK", "block"), ("ALIGNED", "aligned"))]
    if k.copy:
        params.append(Param("COPY", "copy", "constexpr"))
    if k.mode:
        params.append(Param(k.mode, "mode", "constexpr"))
    return tuple(params)


_RULES = {"schema": _schema, "c": _c, "cpu": _cpu, "triton": _triton}
SIGNATURES: dict[str, dict[str, tuple[Param, ...]]] = {
    backend: {name: rule(k) for name, k in KERNELS.items()} for backend, rule in _RULES.items()}


def arguments(params: tuple[Param, ...], kernel: str, tensors: tuple, **values) -> tuple:
    """The arguments of one launch of ``kernel`` in the order of ``params`` (``SIGNATURES[backend][kernel]``), from
    its tensors (in the table's order; a backend may pass their addresses instead) and the other values by name. For
    binding, once per launch: not for the warm step."""
    names = KERNELS[kernel].tensor_names
    if len(tensors) != len(names):
        raise TypeError(f"fastasam: the {kernel} kernel takes {len(names)} tensors ({', '.join(names)}), got "
                        f"{len(tensors)}; pass them in that order")
    values.update(zip(names, tensors))
    return tuple(values[p.value] for p in params)


def schema_text(kernel: str) -> str:
    """The ``torch.library`` schema of ``kernel``'s op, as ``csrc/binding.cpp`` defines it."""
    args = ", ".join(f"{p.type} {p.name}" for p in SIGNATURES["schema"][kernel])
    return f"{kernel}({args}) -> ()"


def c_declaration(kernel: str) -> str:
    """``kernel``'s C launch function, as ``csrc/multi_tensor.h`` declares it (one line)."""
    args = ", ".join(f"{p.type} {p.name}" for p in SIGNATURES["c"][kernel])
    return f"int fa_{kernel}({args});"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "cuda-entries":
        print(" ".join(e for k in KERNELS.values() for e in k.cuda_entries))
    elif what == "schemas":
        print("\n".join(schema_text(k) for k in KERNELS))
    elif what == "c":
        print("\n".join(c_declaration(k) for k in KERNELS))
    else:
        sys.exit("usage: _signatures.py cuda-entries | schemas | c")
