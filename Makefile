# `make bench`: set up and run the main job (the benchmark suite on whatever device is present).
# `make test`:  set up and run the tests.
# torch is installed first and only when missing (a CPU machine here takes the local 2.13.0 CPU wheel); the package
# is then built with --no-build-isolation so pip never resolves a second, CUDA, torch.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup bench test test-bigmem lint gpu-stack gpu-evidence
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[test,bench]"

# Results go to benchmarks/results/local/ (untracked); `make bench UPDATE=1` rewrites the committed benchmarks/results/.
bench: setup
	$(PYTHON) -m benchmarks $(if $(UPDATE),--update-results)

# One line per test file with the running count ([ n/total]), then the 15 slowest tests. Within 4 GB of memory: the
# tests that need more are marked bigmem and left out (pyproject.toml); `make test-bigmem` runs them (16 GB).
test: setup
	$(PYTHON) -m pytest --durations=15

test-bigmem: setup
	$(PYTHON) -m pytest -m bigmem --durations=15

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

# The documentation site (mkdocs.yml, docs/) into build/site; --strict: a broken link, page or docstring fails it.
# Only the docs extra's packages are installed (no torch: the API pages read the sources).
.PHONY: docs
docs:
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[docs]"
	$(PYTHON) -m mkdocs build --strict -d build/site
