"""The ``cuda`` backend's ``torch.library`` ops (``torch.ops.fastasam.*``): defined in C++ (``csrc/binding.cpp``),
their fake (FakeTensor / meta) versions registered from Python by ``fastasam.backends.cuda``, the module the
C++ library names with ``set_python_module``.

The ops exist only where ``fastasam._C`` is built: with a CUDA build of PyTorch and a CUDA toolkit (``make gpu-stack``
builds it on a machine without a GPU, where PyTorch still makes fake CUDA tensors). The fakes run there on fake CUDA
tensors and meta tensors; ``torch.library.opcheck`` needs a GPU (below).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastasam.backends import _layout as L
from fastasam.backends import cuda as cuda_backend

if cuda_backend.EXTENSION is not None:
    WHY_NOT = None
elif torch.version.cuda is None:
    WHY_NOT = (f"the ops live in fastasam._C, which cannot be built with this PyTorch ({torch.__version__} is not a "
               "CUDA build); `make gpu-stack` builds it and runs these tests on a CPU machine")
else:
    WHY_NOT = (f"fastasam._C is not built ({cuda_backend.EXTENSION_ERROR}); FASTASAM_BUILD_CUDA=1 pip install "
               "--no-build-isolation -e . builds it")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))

MODULE = "fastasam.backends.cuda"
# the tensors each op writes in place (its schema's `Tensor(x!)`); the kernels also write through rows' addresses
WRITES = {"sqnorm": {"rows", "partials", "counter", "out"}, "dots": {"rows", "partials", "counter", "out"},
          "perturb": {"rows"}, "restore": {"rows"}, "restore_sgd": {"rows"}, "restore_adam": {"rows"},
          "combine": {"rows"}}
COUNT, CHUNK, BF16 = 5, cuda_backend.CHUNK, cuda_backend._DTYPE_CODE[torch.bfloat16]


def valid_args(op: str, device: str) -> tuple:
    """Arguments the CUDA op accepts (shapes, dtypes, integers), as empty tensors on ``device``."""

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    rows, chunks = t(4, L.NCOL, dtype=torch.int64), t(COUNT + 1, 2, dtype=torch.int32)
    sums, alpha = t(3, dtype=torch.float64), t(1, dtype=torch.float64)
    return {
        "sqnorm": (rows, chunks, t(2, L.NOPT), t(COUNT), t(1, dtype=torch.int32), t(1), COUNT, CHUNK, BF16),
        "perturb": (rows, chunks, t(2, L.NOPT), t(1), COUNT, CHUNK, BF16, True),
        "restore": (rows, chunks, COUNT, CHUNK, BF16, False),
        "restore_sgd": (rows, chunks, t(2, L.NHYPER), sums, alpha, COUNT, CHUNK, BF16, True, 0),
        "restore_adam": (rows, chunks, t(2, L.NHYPER), sums, alpha, COUNT, CHUNK, BF16, True, L.COMBINE_GSAM),
        "dots": (rows, chunks, t(3 * COUNT, dtype=torch.float64), t(1, dtype=torch.int32), t(3, dtype=torch.float64),
                 COUNT, CHUNK, BF16),
        "combine": (rows, chunks, sums, alpha, COUNT, CHUNK, BF16, L.COMBINE_LOOK_ONE),
    }[op]


def metadata(args: tuple) -> list:
    return [(a.shape, a.stride(), a.dtype, a.device, a.storage_offset()) for a in args if isinstance(a, torch.Tensor)]


def test_every_op_writes_in_place_returns_nothing_and_names_the_module_of_its_fake():
    """The schemas: ``-> ()`` and ``Tensor(x!)`` on exactly the tensors the kernels write (so no graph pass drops or
    reorders a launch, and a fake has nothing to allocate); each op's Python module (the pystub) is the module whose
    import registered its fake."""
    from torch._library.simple_registry import singleton

    assert set(WRITES) == set(cuda_backend.OPS)
    for op in cuda_backend.OPS:
        schema = getattr(torch.ops.fastasam, op).default._schema
        assert schema.returns == [] and schema.is_mutable, op
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == WRITES[op], op
        pystub = torch._C._dispatch_pystub(f"fastasam::{op}", "")
        assert pystub is not None and pystub[0] == MODULE, (op, pystub)
        fake = singleton.find(f"fastasam::{op}").fake_impl.kernel
        assert fake is not None and fake.source.rsplit(":", 1)[0] == cuda_backend.__file__, (op, fake)


@pytest.mark.parametrize("op", cuda_backend.OPS)
def test_the_fake_runs_on_fake_cuda_tensors_returns_nothing_and_changes_no_metadata(op):
    with FakeTensorMode():
        args = valid_args(op, "cuda")
        before = metadata(args)
        assert getattr(torch.ops.fastasam, op)(*args) is None
        assert metadata(args) == before
    meta = valid_args(op, "meta")  # the meta kernel torch makes from the fake
    assert getattr(torch.ops.fastasam, op)(*meta) is None


@pytest.mark.parametrize("op", cuda_backend.OPS)
def test_the_fake_refuses_what_the_cuda_op_refuses(op):
    """A call the CUDA op would refuse when run fails while tracing, with the same message."""
    fn = getattr(torch.ops.fastasam, op)
    with FakeTensorMode():
        args = list(valid_args(op, "cuda"))
        n = next(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))  # count, chunk_size, dtype, ...
        bad = {
            "chunks must be torch.int32": (1, args[1].long()),
            "rows must be \\[\\*, 9\\]": (0, args[0][:, :4].contiguous()),
            "chunks must be a CUDA tensor, got cpu": (1, args[1].to("cpu")),
            "count=7 is outside the 6 chunks": (n, COUNT + 2),
            "chunk_size=12 must be a positive multiple of 8": (n + 1, 12),
            "unsupported storage dtype code 7": (n + 2, 7),
        }
        for message, (i, value) in bad.items():
            with pytest.raises(RuntimeError, match=f"fastasam: {message}"):
                fn(*args[:i], value, *args[i + 1:])
        if op in ("restore_sgd", "restore_adam", "combine"):
            with pytest.raises(RuntimeError, match="fastasam: unknown"):
                fn(*args[:-1], 9)


def test_the_module_the_library_names_registers_the_fakes_and_satisfies_torchs_rule():
    """In a fresh process: with only ``fastasam._C`` imported, a meta call fails naming the module to import (what
    ``set_python_module`` is for); importing it registers every fake. Torch's rule for a C++ op with a Python fake
    (``torch.library._check_pystubs_once``: the C++ library must name the module that registers the fake) is enforced
    where ``torch._utils_internal.REQUIRES_SET_PYTHON_MODULE`` is set, as here; open-source builds of torch 2.11 leave
    it off but always refuse a module other than the one named."""
    code = textwrap.dedent("""
        import importlib, torch, torch._utils_internal
        torch._utils_internal.REQUIRES_SET_PYTHON_MODULE = True
        import fastasam._C
        rows = torch.empty(4, 9, dtype=torch.int64, device="meta")
        chunks = torch.empty(6, 2, dtype=torch.int32, device="meta")
        try:
            torch.ops.fastasam.restore(rows, chunks, 5, 8192, 2, False)
        except NotImplementedError as exc:
            print("without the module:", exc)
        module = importlib.import_module(torch._C._dispatch_pystub("fastasam::restore", "")[0])
        from tests.test_library_ops import valid_args
        for op in module.OPS:
            assert getattr(torch.ops.fastasam, op)(*valid_args(op, "meta")) is None, op
        print("every fake ran from", module.__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"you may need to import the '{MODULE}' Python module" in proc.stdout
    assert f"every fake ran from {MODULE}" in proc.stdout


# --- torch.library.opcheck, on the GPU ------------------------------------------------------------------------------
# opcheck returns without checking anything when an input is a fake or meta tensor (optests' is_abstract), so it runs
# on the real launches of a few optimizer steps. Its utils here: test_schema runs the kernel under SchemaCheckMode (no
# tensor the schema leaves unannotated may change: the read-only tables, sums and options) and test_faketensor runs
# the fake beside it (CrossRefFakeMode: the fake must accept the real arguments and return what the op returns,
# nothing). Left out: test_autograd_registration (opcheck skips it when no input requires grad; the tables never do)
# and test_aot_dispatch_*: they compare eager and compiled runs of cloned inputs, but the kernels write through the
# addresses in rows into the parameters, which no clone copies, so both runs would write the same tensors.


def launches(kind: str, base: type, **kw) -> tuple[dict[str, list], tuple]:
    """The bound launches of three steps of ``kind`` on CUDA bf16 parameters, {op: [partial, ...]}, and what their
    tables point into: the optimizer (its state, buffers and tables) and the parameters (their gradients). The
    launches write through the addresses in their tables, so the caller keeps the second alive while it runs them
    again: freed, that memory would go to other tensors, which a re-run would overwrite."""
    from fastasam.__main__ import KINDS, phases

    seen: dict[str, list] = {}
    bind = cuda_backend._Launcher.bind

    def recording(self, kernel, *args, **kwargs):
        bound = bind(self, kernel, *args, **kwargs)
        seen.setdefault(kernel, []).append(bound)
        return bound

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to("cuda", torch.bfloat16)) for n in (1, 300, 8193)]
    cls, extra = KINDS[kind]
    mp = pytest.MonkeyPatch()
    mp.setattr(cuda_backend._Launcher, "bind", recording)
    try:
        opt = cls(params, base, backend="cuda", rho=0.5, lr=0.01, **extra, **kw)
        for _ in range(3):
            for phase in phases(opt):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to("cuda", torch.bfloat16)
                phase()
    finally:
        mp.undo()
    torch.cuda.synchronize()
    return seen, (opt, params)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="opcheck checks nothing on fake or meta tensors (optests' is_abstract): it needs the real "
                           "launches, on a GPU")
def test_opcheck_schema_and_fake_on_every_launch_of_real_steps():
    seen: dict[str, list] = {}
    alive = []  # every optimizer and its parameters, until the last opcheck has run their launches
    for kind, base, kw in (("ASAM", torch.optim.SGD, {"momentum": 0.9}), ("ASAM", torch.optim.AdamW, {}),
                           ("GSAM", torch.optim.AdamW, {}), ("LookSAM", torch.optim.SGD, {"momentum": 0.9})):
        bound_launches, keep = launches(kind, base, **kw)
        alive.append(keep)
        for op, bound in bound_launches.items():
            seen.setdefault(op, []).extend(bound)
    assert set(seen) == set(cuda_backend.OPS)
    for op, bound in seen.items():
        for b in bound[:4]:
            assert b.func is getattr(torch.ops.fastasam, op).default
            result = torch.library.opcheck(b.func, tuple(b.args), test_utils=("test_schema", "test_faketensor"))
            assert result == {"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}, (op, result)
    torch.cuda.synchronize()
    assert len(alive) == 4  # held to here
