"""Installs the pure-Python package; never pulls a torch wheel (install torch first, then
``pip install --no-build-isolation .``). ``kernels/`` installs as ``fastasam.kernels``."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _version() -> str:
    for line in (ROOT / "fastasam" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("fastasam/__init__.py has no __version__")


setup(
    name="fastasam",
    version=_version(),
    description="Fast, faithful ASAM and SAM optimizers for PyTorch (fused multi-tensor backends)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["fastasam", "fastasam.backends", "fastasam.kernels"],
    package_dir={"fastasam.kernels": "kernels"},
    package_data={"fastasam": ["py.typed"]},
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "ruff", "triton; platform_system == 'Linux'"],
        "bench": ["matplotlib"],
        "triton": ["triton"],
    },
    zip_safe=False,
)
