# `make bench`: set up and run the main job (the benchmark suite on whatever device is present).
# `make test`:  set up and run the tests.
# torch is installed first and only when missing (a CPU machine here takes the local 2.13.0 CPU wheel); the package
# is then built with --no-build-isolation so pip never resolves a second, CUDA, torch.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup bench test lint gpu-stack gpu-evidence
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[test,bench]"

bench: setup
	$(PYTHON) -m benchmarks

test: setup
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

# The GPU machines' stack (torch 2.11.0 CUDA 13.0 build, Triton 3.6.0) in .venv/gpu-stack: real extension build for
# sm_80/sm_90, Triton compile check, the test suite on the CPU (scripts/gpu_stack.sh; ~5 GB once, then minutes).
gpu-stack:
	bash scripts/gpu_stack.sh

# On a GPU machine: the GPU evidence in two self-contained parts of at most 8 minutes each (scripts/gpu_evidence.sh):
# PART=1 the driver, fastasam._C for this GPU, --check, the kernel/oracle tests on the GPU, compute-sanitizer;
# PART=2 the step-time and end-to-end benchmarks. Results in benchmarks/results/gpu/.
PART ?= 1
gpu-evidence:
	bash scripts/gpu_evidence.sh part$(PART)
