"""Backend registry: which implementations exist, which work on a device, and what ``auto`` picks.

A backend is a module exposing ``name``, ``device_supported(device) -> str | None`` (None when usable, else the
reason), ``grad_sqnorm(bucket)``, ``perturb_(bucket, restore)`` and ``restore_(bucket, restore)`` (see
``fastasam.backends.reference`` for the contract). ``auto`` takes, per device type, the available backend with the
highest priority and never raises: ``reference`` works everywhere. The modules are named after their backends:
``fastasam.backends.{reference,foreach,cpu,triton,cuda}``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

import torch


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend: the module that implements it and its ``auto`` priority per device type."""

    name: str
    module: str
    auto_priority: dict[str, int] = field(default_factory=dict)  # device type -> priority; missing = never auto
    fix: str = ""  # what to do when it is unavailable
    device_types: tuple[str, ...] = ()  # the device types its kernels can run on at all; empty = every one


_REGISTRY: dict[str, BackendSpec] = {}
_LOADED: dict[str, ModuleType | str] = {}  # name -> module, or the import error's text


def register(spec: BackendSpec) -> None:
    """Add (or replace) a backend (the test suite adds its ``cuda_shim``, ``fastasam.testing.cuda_shim``, so)."""
    _REGISTRY[spec.name] = spec
    _LOADED.pop(spec.name, None)


def _load(name: str) -> ModuleType | str:
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_REGISTRY[name].module)
        except Exception as exc:  # an optional dependency is missing or broken
            _LOADED[name] = f"{type(exc).__name__}: {exc}"
    return _LOADED[name]


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None when backend ``name`` works for tensors on ``device``, else why not."""
    device = torch.device(device)
    mod = _load(name)
    if isinstance(mod, str):
        return f"it could not be imported ({mod})"
    return mod.device_supported(device)


def names() -> list[str]:
    return ["auto", *_REGISTRY]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that work here: for ``device`` when given, else for any device this machine has."""
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda", torch.cuda.current_device()))
    else:
        devices = [torch.device(device)]
    return [n for n in _REGISTRY if any(unavailable_reason(n, d) is None for d in devices)]


def check_name(name: str) -> None:
    """Raise ``ValueError`` for a name that is not a backend at all (checked at construction)."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"fastasam: unknown backend {name!r}; choose one of {names()}.")


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module to run for tensors on ``device``. ``auto`` never raises; a named backend that cannot run
    there raises ``RuntimeError`` with the reason and the fix."""
    check_name(name)
    if name == "auto":
        ranked = sorted(
            (spec for spec in _REGISTRY.values() if device.type in spec.auto_priority),
            key=lambda spec: -spec.auto_priority[device.type],
        )
        for spec in ranked:
            if unavailable_reason(spec.name, device) is None:
                return _load(spec.name)  # type: ignore[return-value]
        return _load("reference")  # type: ignore[return-value]
    spec = _REGISTRY[name]
    if spec.device_types and device.type not in spec.device_types and unavailable_reason(name, device) is not None:
        here = resolve("auto", device).name
        others = [n for n in available_backends(device) if n != name]
        raise RuntimeError(
            f"fastasam: backend {name!r} cannot run on {device}: its kernels run on {' or '.join(spec.device_types)} "
            f"tensors. Fix: use backend=\"auto\" (here it picks {here!r} for {device.type} tensors) or one of "
            f"{others}, or move the parameters to a {' or '.join(spec.device_types)} device before building the "
            "optimizer."
        )
    reason = unavailable_reason(name, device)
    if reason is not None and hasattr(_LOADED.get(name), "on_demand"):
        _LOADED[name].on_demand(device)  # a backend that can make itself available when named (cuda: JIT build)
        reason = unavailable_reason(name, device)
    if reason is not None:
        fix = spec.fix or 'use backend="auto", which falls back to what works'
        raise RuntimeError(f"fastasam: backend {name!r} cannot run on {device}: {reason}. Fix: {fix}.")
    return _load(name)  # type: ignore[return-value]


register(BackendSpec("reference", "fastasam.backends.reference",
                     auto_priority={"cpu": 10, "cuda": 0, "mps": 0, "xpu": 0}))
register(BackendSpec("foreach", "fastasam.backends.foreach", auto_priority={"cpu": 20, "cuda": 10, "xpu": 10}))
register(
    BackendSpec(
        "cpu", "fastasam.backends.cpu", auto_priority={"cpu": 30}, device_types=("cpu",),
        fix="reinstall fastasam where a C++ compiler is (pip install --no-build-isolation -e .; FASTASAM_BUILD_HOST=1 "
            "makes a failed build an error), or use backend=\"auto\"",
    )
)
register(
    BackendSpec(
        "triton", "fastasam.backends.triton", auto_priority={"cuda": 30}, device_types=("cuda",),
        fix="pip install triton (Linux, with a CUDA build of PyTorch) and use CUDA tensors, or backend=\"auto\"",
    )
)
register(
    BackendSpec(
        "cuda", "fastasam.backends.cuda", auto_priority={"cuda": 25}, device_types=("cuda",),
        fix="build the extension on a machine with a CUDA toolkit and a CUDA build of PyTorch: "
            "FASTASAM_BUILD_CUDA=1 pip install --no-build-isolation -e ., or python -m fastasam --build "
            "(just in time, needs ninja), or use backend=\"auto\"",
    )
)
