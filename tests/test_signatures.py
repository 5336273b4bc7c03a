"""One table of every multi-tensor kernel's arguments (``fastasam/backends/_signatures.py``) against every source that
spells a signature: the C header and the CUDA definitions, the op schemas and the C++ functions behind them (and
their calls into the C interface), the CPU module's functions and their Python names, the Triton kernels, the ops'
fakes, and the launches each backend binds. Each check is a function of the source text, run on the file and on the
file with a planted mismatch (two arguments swapped), which it must report."""

from __future__ import annotations

import ctypes
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastasam.backends import _layout as L
from fastasam.backends import _signatures as S
from fastasam.backends import cpu as cpu_backend
from fastasam.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _read(name: str) -> str:
    return (CSRC / name).read_text()


# The fused updates are declared, defined and registered once each through macros (elementwise.h's list
# FA_FUSED_UPDATES, multi_tensor.h's FA_UPDATE_PARAMS): the checks read each source as the C preprocessor expands it.
_UPDATE_MACROS = ("FA_FUSED_UPDATES", "FA_UPDATE_PARAMS", "FA_DECLARE_UPDATE")
# what an includer of multi_tensor.h writes to declare the fused updates (binding.cpp)
_DECLARE_UPDATES = '\nextern "C" {\nFA_FUSED_UPDATES(FA_DECLARE_UPDATE)\n}\n'


def _defines(text: str) -> str:
    """The ``#define`` directives of the fused updates' macros in ``text`` (continuation lines included)."""
    return "\n".join(m.group(0) for m in re.finditer(r"^#define (\w+)(?:[^\n]*\\\n)*[^\n]*", text, re.M)
                     if m.group(1) in _UPDATE_MACROS)


def _expanded(text: str, header: str, elementwise: str) -> str:
    """``text`` through the C preprocessor (comments dropped, macros expanded), its ``#include`` lines dropped and
    the fused updates' macros of ``header`` (multi_tensor.h) and ``elementwise`` (elementwise.h) defined first."""
    source = _defines(elementwise) + "\n" + _defines(header) + "\n" + re.sub(r"^\s*#\s*(include|pragma)[^\n]*", "",
                                                                          text, flags=re.M)
    return subprocess.run(["cpp", "-P", "-w", "-x", "c++", "-"], input=source, capture_output=True, text=True,
                          check=True).stdout


def _source(name: str, files: dict[str, str] | None = None) -> str:
    """A csrc file as the checks read it (of ``files``, else the repository's): expanded; the header with the fused
    updates' declarations its includers make."""
    files = files or {}
    header, elementwise = (files.get(f) or _read(f) for f in ("multi_tensor.h", "elementwise.h"))
    text = files.get(name) or _read(name)
    return _expanded(text + (_DECLARE_UPDATES if name == "multi_tensor.h" else ""), header, elementwise)


def _no_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


def _params(text: str) -> list[tuple[str, str]]:
    """``"const int64_t* rows, int count"`` -> ``[("rows", "const int64_t*"), ("count", "int")]``."""
    out = []
    for part in " ".join(text.split()).split(","):
        m = re.fullmatch(r"\s*(.*?)\s*(\w+)\s*", part)
        out.append((m.group(2), m.group(1).replace(" *", "*").replace(" &", "&")))
    return out


def _c_type(t: str) -> str:
    """C spellings of one type: ``int`` is the kernels' ``int32_t``."""
    return re.sub(r"\bint\*", "int32_t*", t)


def _expected(backend: str, kernel: str) -> list[tuple[str, str]]:
    return [(p.name, p.type) for p in S.SIGNATURES[backend][kernel]]


def _compare(what: str, kernel: str, found: list[tuple[str, str]], expected: list[tuple[str, str]]) -> list[str]:
    return [] if found == expected else [f"{what} {kernel}: {found} != the table's {expected}"]


# --- the C interface: multi_tensor.h declares, multi_tensor.cu defines ----------------------------------------------


def c_problems(text: str, definitions: bool) -> list[str]:
    """The ``fa_<kernel>`` functions of the header (``definitions``: of the .cu source) against the table's C order and
    types; every kernel of the table is there, and no other."""
    end = r"\)\s*\{" if definitions else r"\);"
    found = {k: _params(args) for k, args in re.findall(r"\bint fa_(\w+)\(([^)]*)" + end, _no_comments(text))}
    problems = [] if set(found) == set(S.KERNELS) else [f"fa_* functions {sorted(found)} != {sorted(S.KERNELS)}"]
    for k in S.KERNELS.keys() & found.keys():
        problems += _compare("fa_", k, [(n, _c_type(t)) for n, t in found[k]], _expected("c", k))
    return problems


def test_the_c_header_declares_each_kernel_as_the_table_orders_it():
    assert c_problems(_source("multi_tensor.h"), definitions=False) == []


def test_the_cuda_source_defines_each_kernel_as_the_table_orders_it():
    assert c_problems(_source("multi_tensor.cu"), definitions=True) == []


# --- binding.cpp: the op schemas, the C++ ops, their calls into the C interface -------------------------------------


def _schemas(text: str) -> dict[str, str]:
    """``m.def("...")`` texts of the TORCH_LIBRARY block (adjacent string literals joined)."""
    out = {}
    for literals in re.findall(r'm\.def\(((?:\s*"[^"]*")+)\s*\)', text):
        schema = "".join(re.findall(r'"([^"]*)"', literals))
        out[schema.split("(", 1)[0]] = schema
    return out


def _call_args(text: str, start: int) -> list[str]:
    """The top-level arguments of the call whose ``(`` is at ``start``."""
    depth, args, cur = 0, [], ""
    for ch in text[start:]:
        if ch in "(<" and not (ch == "<" and depth == 0):
            depth += 1
            if depth == 1:
                continue
        elif ch in ")>" and not (ch == ">" and depth == 0):
            depth -= 1
            if depth == 0:
                args.append(cur)
                return [" ".join(a.split()) for a in args]
        elif ch == "," and depth == 1:
            args.append(cur)
            cur = ""
            continue
        cur += ch
    raise ValueError("unbalanced call")


def _value_of(arg: str) -> str:
    """The launch value a C++ call argument passes: ``static_cast<int>(count)`` -> count, ``rows.data_ptr<T>()`` ->
    rows, ``stream_of(rows)`` -> stream."""
    arg = re.sub(r"^static_cast<[\w:]+>\((.*)\)$", r"\1", arg.strip())
    return "stream" if arg.startswith("stream_of(") else re.match(r"\w+", arg).group(0)


def binding_problems(text: str) -> list[str]:
    """binding.cpp: each schema equals the table's; each op's C++ function takes the schema's arguments in its order
    (a written tensor by non-const reference, a read one by const reference); each call into the C interface passes
    the C order (the fused updates: through ``UpdateLauncher``, whose type is the C signature's)."""
    code = _no_comments(text)
    schemas = _schemas(code)
    problems = [] if set(schemas) == set(S.KERNELS) else [f"schemas {sorted(schemas)} != {sorted(S.KERNELS)}"]
    cpp_type = {"Tensor": "const at::Tensor&", "int": "int64_t", "bool": "bool"}
    for k in S.KERNELS:
        if schemas.get(k) != S.schema_text(k):
            problems.append(f"schema {schemas.get(k)!r} != the table's {S.schema_text(k)!r}")
        m = re.search(rf"\bvoid {k}\(([^)]*)\)\s*\{{", code)
        want = [(p.name, "at::Tensor&" if p.type.endswith("!)") else cpp_type[p.type])
                for p in S.SIGNATURES["schema"][k]]
        problems += _compare("C++ op", k, _params(m.group(1)) if m else [], want)
        call = re.search(rf"(?<!int )\bfa_{k}\(", code) or re.search(r"\blaunch\(", code)  # not the declaration
        passed = [_value_of(a) for a in _call_args(code, call.end() - 1)] if call else []
        problems += _compare("the call of fa_", k, [(v, "") for v in passed],
                             [(p.value, "") for p in S.SIGNATURES["c"][k]])
    m = re.search(r"using UpdateLauncher = int \(\*\)\(([^)]*)\);", code)
    types = [" ".join(t.split()).replace(" *", "*") for t in m.group(1).split(",")] if m else []
    for k in ("restore_sgd", "restore_adam"):
        problems += _compare("UpdateLauncher's types for", k, [(_c_type(t), "") for t in types],
                             [(t, "") for _, t in _expected("c", k)])
    return problems


def test_the_op_schemas_and_the_cpp_ops_follow_the_table():
    assert binding_problems(_source("binding.cpp")) == []


# --- the cpu backend's module: cpu_loops.h's functions, cpu_kernels.cpp's Python names -----------------------------


def cpu_problems(kernels_cpp: str, loops_h: str) -> list[str]:
    problems = []
    args = {k: re.findall(r'py::arg\("(\w+)"\)', a)
            for k, a in re.findall(r'm\.def\("(\w+)", k\.\w+((?:,\s*py::arg\("\w+"\))*)\)', kernels_cpp)}
    if set(args) != set(S.KERNELS):
        problems.append(f"cpu_kernels.cpp defines {sorted(args)}, the table {sorted(S.KERNELS)}")
    loops = {k: _params(a) for k, a in re.findall(r"\bvoid (\w+)\(([^)]*)\)\s*\{", _no_comments(loops_h))}
    for k in S.KERNELS:
        problems += _compare("py::arg of", k, [(n, "") for n in args.get(k, [])],
                             [(n, "") for n, _ in _expected("cpu", k)])
        problems += _compare("cpu_loops.h", k, loops.get(k, []), _expected("cpu", k))
    return problems


def test_the_cpu_module_follows_the_table():
    assert cpu_problems(_source("cpu_kernels.cpp"), _read("cpu_loops.h")) == []


# --- the fused updates: elementwise.h's list and hyper-parameter structs, the _updates classes -----------------------


def _update_classes() -> tuple:
    from fastasam.backends._updates import FUSED_UPDATES

    return FUSED_UPDATES


def _struct_fields(text: str, struct: str) -> list[str]:
    m = re.search(rf"\bstruct {struct} \{{([^}}]*)\}};", _no_comments(text))
    if not m:
        return []
    return [name.strip() for decl in m.group(1).split(";") if decl.strip()
            for name in re.sub(r"^\s*\w+\s+", "", decl).split(",")]


def update_problems(elementwise_h: str, classes: tuple) -> list[str]:
    """elementwise.h's FA_FUSED_UPDATES lists the classes' kernels in their order; each kernel's hyper struct
    (``restore_sgd``: ``SgdHyper``) has the class's ``columns`` as its fields, in order, and its reader takes column i
    into field i; the widest row fits the table."""
    listed, kernels = S.c_update_kernels(elementwise_h), tuple(c.kernel for c in classes)
    problems = [] if listed == kernels else [f"FA_FUSED_UPDATES lists {listed}, _updates.FUSED_UPDATES {kernels}"]
    for c in classes:
        struct = c.kernel.removeprefix("restore_").title().replace("_", "") + "Hyper"
        fields = _struct_fields(elementwise_h, struct)
        if fields != list(c.columns):
            problems.append(f"struct {struct} has the fields {fields}, {c.__name__}.columns {list(c.columns)}")
        m = re.search(rf"\b{struct} \w+\(const float\* h\)\s*\{{\s*return \{{([^}}]*)\}}", elementwise_h)
        read = [int(i) for i in re.findall(r"\bh\[(\d+)\]", m.group(1))] if m else []
        if read != list(range(len(c.columns))):
            problems.append(f"{struct}'s reader takes the columns {read}, not 0..{len(c.columns) - 1} in order")
        if len(c.columns) > L.NHYPER:
            problems.append(f"{c.__name__} has {len(c.columns)} columns, the hyper table {L.NHYPER}")
    return problems


def test_the_fused_updates_hyper_rows_are_their_structs():
    assert update_problems(_read("elementwise.h"), _update_classes()) == []


def test_the_script_mode_reads_the_c_list():
    """``csrc/check.sh`` runs ``_signatures.py`` without torch: it reads the fused updates from elementwise.h."""
    out = subprocess.run([sys.executable, "-S", str(ROOT / "fastasam/backends/_signatures.py"), "cuda-entries"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [e for k in S.KERNELS.values() for e in k.cuda_entries]


# --- planted mismatches: each check above reports them -------------------------------------------------------------

# (file, text, planted text): whitespace in the text matches any whitespace (line breaks)
PLANTS = {
    "header: sums and alpha": ("multi_tensor.h", "fa_combine(int dtype, const int64_t* rows, const int32_t* chunks, "
                               "const double* sums, const double* alpha", "fa_combine(int dtype, const int64_t* rows, "
                               "const int32_t* chunks, const double* alpha, const double* sums"),
    "header: count's type": ("multi_tensor.h", "fa_restore(int dtype, const int64_t* rows, const int32_t* chunks, "
                             "int count", "fa_restore(int dtype, const int64_t* rows, const int32_t* chunks, "
                             "int64_t count"),
    "cu: partials and out": ("multi_tensor.cu", "double* partials, int* counter, double* out, cudaStream_t stream) {",
                             "double* out, int* counter, double* partials, cudaStream_t stream) {"),
    "schema: sums and alpha": ("binding.cpp", "combine(Tensor(a!) rows, Tensor chunks, Tensor sums, Tensor alpha",
                               "combine(Tensor(a!) rows, Tensor chunks, Tensor alpha, Tensor sums"),
    "schema: a written tensor unmarked": ("binding.cpp", '"Tensor(d!) out, int count, int chunk_size, int dtype',
                                          '"Tensor out, int count, int chunk_size, int dtype'),
    "C++ op: count and chunk_size": ("binding.cpp", "at::Tensor& out, int64_t count, int64_t chunk_size, "
                                     "int64_t dtype) { check_tables(rows, chunks, count, chunk_size, dtype); "
                                     'check(partials, "partials", at::kDouble',
                                     "at::Tensor& out, int64_t chunk_size, int64_t count, "
                                     "int64_t dtype) { check_tables(rows, chunks, count, chunk_size, dtype); "
                                     'check(partials, "partials", at::kDouble'),
    "call: partials and out": ("binding.cpp", "chunk_size, partials.data_ptr<double>(), counter.data_ptr<int32_t>(), "
                               "out.data_ptr<double>()", "chunk_size, out.data_ptr<double>(), "
                               "counter.data_ptr<int32_t>(), partials.data_ptr<double>()"),
    "UpdateLauncher: copy's type": ("binding.cpp", "int64_t, int, int, cudaStream_t",
                                    "int64_t, bool, int, cudaStream_t"),
    "py::arg: count and chunk_size": ("cpu_kernels.cpp", 'py::arg("alpha"), py::arg("count"), py::arg("chunk_size"), '
                                      'py::arg("mode")', 'py::arg("alpha"), py::arg("chunk_size"), '
                                      'py::arg("count"), py::arg("mode")'),
    "update list: a kernel renamed": ("elementwise.h", 'X(restore_adam, "restore + Adam")',
                                      'X(restore_adamw, "restore + Adam")'),
    "update struct: two fields swapped": ("elementwise.h", "float lr, momentum, one_minus_dampening, weight_decay;",
                                          "float momentum, lr, one_minus_dampening, weight_decay;"),
    "update reader: two columns swapped": ("elementwise.h", "return {h[0], h[1], h[2], h[3], h[4] != 0.f, h[5], h[6]};",
                                           "return {h[0], h[2], h[1], h[3], h[4] != 0.f, h[5], h[6]};"),
    "FA_UPDATE_PARAMS: count and chunk_size": ("multi_tensor.h", "int count, int64_t chunk_size, int copy, int mode",
                                               "int64_t chunk_size, int count, int copy, int mode"),
    "update schema: copy and mode": ("binding.cpp", '"int chunk_size, int dtype, bool copy, int mode) -> ()");',
                                     '"int chunk_size, int dtype, int mode, bool copy) -> ()");'),
    "update py::arg: hyper and sums": ("cpu_kernels.cpp", 'py::arg("hyper"), py::arg("sums"),',
                                       'py::arg("sums"), py::arg("hyper"),'),
    "cpu_loops.h: sums and alpha": ("cpu_loops.h", "void combine(int dtype, int64_t rows, int64_t chunks, "
                                    "int64_t sums, int64_t alpha", "void combine(int dtype, int64_t rows, "
                                    "int64_t chunks, int64_t alpha, int64_t sums"),
}


def _problems_with(files: dict[str, str]) -> list[str]:
    return (c_problems(_source("multi_tensor.h", files), False) + c_problems(_source("multi_tensor.cu", files), True)
            + binding_problems(_source("binding.cpp", files))
            + cpu_problems(_source("cpu_kernels.cpp", files), files["cpu_loops.h"])
            + update_problems(files["elementwise.h"], _update_classes()))


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_planted_mismatch_is_reported(plant):
    files = {f: _read(f) for f in ("multi_tensor.h", "multi_tensor.cu", "binding.cpp", "cpu_kernels.cpp",
                                   "cpu_loops.h", "elementwise.h")}
    assert _problems_with(files) == []
    name, old, new = PLANTS[plant]
    pattern = r"\s+".join(re.escape(word) for word in old.split())  # whatever the line breaks
    files[name], n = re.subn(pattern, lambda _: new, files[name])
    assert n == 1, f"the plant {plant!r} no longer matches csrc/{name}; update it"
    assert _problems_with(files), plant


# --- Python: the Triton kernels, the ops' fakes, the bound launches ------------------------------------------------


def test_the_triton_kernels_follow_the_table():
    triton = pytest.importorskip("triton")
    del triton
    from fastasam.kernels import multi_tensor as K

    for k, params in S.SIGNATURES["triton"].items():
        fn = getattr(K, f"{k}_kernel")
        sig = inspect.signature(getattr(fn, "fn", fn))
        found = [(n, "constexpr" if "constexpr" in str(p.annotation) else "") for n, p in sig.parameters.items()]
        assert found == [(p.name, "constexpr" if p.type == "constexpr" else "") for p in params], k


def test_the_fakes_take_the_schemas_arguments():
    for k in S.KERNELS:
        names = list(inspect.signature(cuda_backend.FAKES[k]).parameters)
        assert names == [p.name for p in S.SIGNATURES["schema"][k]], k


@pytest.mark.skipif(cuda_backend.EXTENSION is None, reason="the ops exist where fastasam._C is built")
def test_the_registered_ops_have_the_tables_schemas():
    for k in S.KERNELS:
        assert str(getattr(torch.ops.fastasam, k).default._schema) == f"fastasam::{S.schema_text(k)}", k


def _values(kernel: str, tensors: tuple) -> dict[str, object]:
    return dict(zip(S.KERNELS[kernel].tensor_names, tensors, strict=True))


def _launch_tensors(kernel: str) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(2) for _ in S.KERNELS[kernel].tensors)  # distinct storages: distinct addresses


def test_the_cuda_launches_pass_each_value_to_its_parameter(monkeypatch):
    """Each op is bound with its tensors, count, chunk size, dtype code, restore mode and mode where the op's
    (fake's, i.e. the schema's) parameters of those names take them."""
    fns = {k: (lambda *args: None) for k in S.KERNELS}
    ops = type("Ops", (), {k: type("Op", (), {"default": staticmethod(fn)}) for k, fn in fns.items()})
    monkeypatch.setattr(torch.ops, "fastasam", ops, raising=False)
    for k in S.KERNELS:
        tensors = _launch_tensors(k)
        launch = cuda_backend._Launcher().bind(k, 7, tensors, torch.bfloat16, True, True, mode=3)
        assert launch.func is fns[k]
        bound = inspect.signature(cuda_backend.FAKES[k]).bind(*launch.args).arguments
        want = {**_values(k, tensors), "count": 7, "chunk_size": cuda_backend.CHUNK,
                "dtype": cuda_backend._DTYPE_CODE[torch.bfloat16], "copy": True, "mode": 3}
        assert all(bound[n] is want[n] or bound[n] == want[n] for n in bound), k


def _pybind_names(fn) -> list[str]:
    return re.findall(r"(\w+): ", fn.__doc__.splitlines()[0])


@pytest.mark.skipif(cpu_backend.EXTENSION is None, reason="fastasam._cpu is not built")
def test_the_cpu_launches_pass_each_value_to_its_parameter():
    """Against the compiled module's own parameter names (pybind's signature line)."""
    launcher = cpu_backend._Launcher(64)
    for k in S.KERNELS:
        tensors = _launch_tensors(k)
        launch = launcher.bind(k, 5, tensors, torch.float32, True, False, mode=2)
        names = _pybind_names(launch.func)
        want = {**{n: t.data_ptr() for n, t in _values(k, tensors).items()}, "count": 5, "chunk_size": 64,
                "dtype": cpu_backend._DTYPE_CODE[torch.float32], "copy": False, "mode": 2}
        assert names == [p.name for p in S.SIGNATURES["cpu"][k]], k
        assert dict(zip(names, launch.args, strict=True)) == {n: want[n] for n in names}, k


def test_the_shim_launches_pass_each_value_to_its_parameter(monkeypatch):
    """The ``cuda_shim`` launches call ``fa_<kernel>`` with the header's parameters in the header's order, and the
    library's ctypes argument types are the header's."""
    from fastasam.testing import cuda_shim

    header = {k: _params(a) for k, a in re.findall(r"\bint fa_(\w+)\(([^)]*)\);", _source("multi_tensor.h"))}
    calls = []
    fake = type("Shim", (), {"lib": type("Lib", (), {"fa_shim_ranges_from_rows": staticmethod(lambda *a: None)}),
                             "launch": staticmethod(lambda kernel, *args: calls.append((kernel, args)))})
    monkeypatch.setattr(cuda_shim, "_LIB", fake)
    for k in S.KERNELS:
        tensors = _launch_tensors(k)
        cuda_shim._Launcher().bind(k, 3, tensors, torch.float16, True, True, mode=1)()
        kernel, args = calls.pop()
        want = {**{n: t.data_ptr() for n, t in _values(k, tensors).items()}, "count": 3,
                "chunk_size": cuda_shim.CHUNK, "dtype": cuda_shim._DTYPE_CODE[torch.float16], "copy": 1, "mode": 1,
                "stream": None}
        assert kernel == k and dict(zip([n for n, _ in header[k]], args, strict=True)) == {n: want[n] for n, _ in
                                                                                            header[k]}, k


def test_the_shim_librarys_ctypes_are_the_headers(monkeypatch):
    from fastasam.testing import cuda_shim

    seen = {}

    class Fn:
        def __setattr__(self, name, value):
            seen.setdefault(self.name, {})[name] = value

    class Lib:
        def __getattr__(self, name):
            fn = Fn()
            object.__setattr__(fn, "name", name)
            return fn

    monkeypatch.setattr(cuda_shim.ctypes, "CDLL", lambda path: Lib())
    monkeypatch.setattr(cuda_shim.ShimLibrary, "configure", lambda self, *a, **k: None)
    cuda_shim.ShimLibrary(Path("unused.so"))
    ctype = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "cudaStream_t": ctypes.c_void_p}
    for k, params in re.findall(r"\bint fa_(\w+)\(([^)]*)\);", _source("multi_tensor.h")):
        want = [ctypes.c_void_p if t.endswith("*") else ctype[t] for _, t in _params(params)]
        assert seen[f"fa_{k}"] == {"argtypes": want, "restype": ctypes.c_int}, k


def test_triton_launches_pass_each_value_to_its_parameter():
    pytest.importorskip("triton")
    from fastasam.backends import triton as T

    for k in S.KERNELS:
        tensors = _launch_tensors(k)
        launch = T._Launcher().bind(k, 4, tensors, torch.bfloat16, False, True, mode=3)
        fn = getattr(launch.kernel, "fn", launch.kernel)
        bound = inspect.signature(fn).bind(*launch.args).arguments
        want = {**_values(k, tensors), "n_programs": 4, "DTYPE": T._TL_DTYPE[torch.bfloat16],
                "ACC": T._TL_DTYPE[torch.float32], "CHUNK": T.CHUNK, "BLOCK": T.BLOCK, "ALIGNED": False, "COPY": True,
                "MODE": 3, "DIRECTION": 3}
        assert launch.grid == 4 and all(bound[n] is want[n] or bound[n] == want[n] for n in bound), k


def test_arguments_refuses_a_wrong_number_of_tensors():
    with pytest.raises(TypeError, match=r"fastasam: the perturb kernel takes 4 tensors \(rows, chunks, opts, sqnorm\)"):
        S.arguments(S.SIGNATURES["schema"]["perturb"], "perturb", (1, 2, 3), count=1, chunk_size=8, dtype=0, copy=1)


# --- where a fused update is written: five files --------------------------------------------------------------------

# the formula (and its hyper struct, and the list of updates), the CUDA, CPU and Triton loops, the Python class
UPDATE_FILES = {"csrc/elementwise.h", "csrc/multi_tensor.cu", "csrc/cpu_loops.h", "kernels/multi_tensor.py",
                "fastasam/backends/_updates.py"}


def _update_names(cls) -> set[str]:
    """What names one fused update: its kernel, its class, its hyper struct and the struct's reader / the formula
    (``restore_adam``: ``AdamUpdate``, ``AdamHyper``, ``adam_hyper``, ``adam_update``)."""
    stem = cls.kernel.removeprefix("restore_")
    return {cls.kernel, cls.__name__, stem.title().replace("_", "") + "Hyper", f"{stem}_hyper", f"{stem}_update"}


def update_footprint(sources: dict[str, str], cls) -> set[str]:
    """The product's source files (of ``sources``: path -> text) that name the fused update ``cls``."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, _update_names(cls))) + r")\b")
    return {path for path, text in sources.items() if pattern.search(text)}


def _product_sources() -> dict[str, str]:
    paths = subprocess.run(["git", "ls-files", "fastasam", "csrc", "kernels", "setup.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return {p: (ROOT / p).read_text() for p in paths if p.endswith((".py", ".h", ".cu", ".cpp"))}


@pytest.mark.parametrize("cls", _update_classes(), ids=lambda c: c.kernel)
def test_a_fused_update_is_written_in_five_files(cls):
    """Everything else (declarations, op schemas and registrations, the CPU module's table, the fakes, the kernel
    signatures, the binders) derives from the list in elementwise.h and the class in _updates.py; the engine and the
    step plan see an update only through its class's interface. A mention elsewhere is caught."""
    sources = _product_sources()
    assert update_footprint(sources, cls) == UPDATE_FILES
    planted = {**sources, "fastasam/_step_plan.py": sources["fastasam/_step_plan.py"] + f"\n# {cls.__name__}\n"}
    assert update_footprint(planted, cls) == UPDATE_FILES | {"fastasam/_step_plan.py"}


# --- where a fused variant is written: Momentum-SAM's files ---------------------------------------------------------

# Momentum-SAM, the variant with kernels of its own, by what each file holds (docs/design/map.md, "Adding a variant")
VARIANT_FILES = {
    # the variant: its class, and the public names
    "fastasam/variants/msam.py", "fastasam/variants/__init__.py", "fastasam/__init__.py",
    # its per-element formulas, the loops over them (CUDA, CPU, Triton) and the oracle's per-tensor form
    "csrc/elementwise.h", "csrc/multi_tensor.cu", "csrc/cpu_loops.h", "kernels/multi_tensor.py",
    "fastasam/backends/reference.py",
    # its two ops declared by hand: C declarations, op schemas and registrations, the CPU table, fakes, signatures
    "csrc/multi_tensor.h", "csrc/binding.cpp", "csrc/cpu_kernels.cpp", "fastasam/backends/cuda.py",
    "fastasam/backends/_signatures.py",
    # where a one-pass optimizer differs for the integrations: --check, Hugging Face, Lightning
    "fastasam/__main__.py", "fastasam/hf.py", "fastasam/lightning.py",
}


def variant_footprint(sources: dict[str, str], name: str) -> set[str]:
    pattern = re.compile(re.escape(name), re.IGNORECASE)
    return {path for path, text in sources.items() if pattern.search(text)}


def test_a_fused_variant_is_written_in_the_files_the_design_page_lists():
    """The files that name MSAM are exactly those the design page lists (a new mention elsewhere, as the step plan
    learning of one variant, is caught), and the page lists each of them."""
    sources = _product_sources()
    assert variant_footprint(sources, "msam") == VARIANT_FILES
    planted = {**sources, "fastasam/_step_plan.py": sources["fastasam/_step_plan.py"] + "\n# MSAM\n"}
    assert variant_footprint(planted, "msam") == VARIANT_FILES | {"fastasam/_step_plan.py"}
    page = (ROOT / "docs" / "design" / "map.md").read_text().split("\n## Adding a variant\n", 1)[1].split("\n## ")[0]
    listed = set(re.findall(r"`((?:fastasam|csrc|kernels)/[\w/]+\.\w+)`", page))
    assert listed == VARIANT_FILES, sorted(listed ^ VARIANT_FILES)
    assert f"{len(VARIANT_FILES)} files" in page
