# `make bench`: set up and run the main job (the benchmark suite on whatever device is present).
# `make test`:  set up and run the tests.
# `make setup` (scripts/setup_env.py): torch first, only when missing (a CPU machine here takes the local 2.13.0 CPU
# wheel), then the package, editable, built with --no-build-isolation so pip never resolves a second, CUDA, torch. The
# C++ extensions are built once per Python environment and again only when their sources (or torch) change; a run
# that has nothing to do says so in one line.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench
# pytest-xdist workers (make test JOBS=1 runs in one process)
JOBS ?= auto

.PHONY: setup bench test test-slow test-bigmem lint gpu-stack gpu-evidence
setup:
	@$(PYTHON) scripts/setup_env.py --torch "$(TORCH_SPEC)" --extras "$(EXTRAS)"

# Results go to benchmarks/results/local/ (untracked); `make bench UPDATE=1` rewrites the committed benchmarks/results/;
# `make bench SMOKE=1` runs the suite's tiny configuration (seconds).
bench: setup
	$(PYTHON) -m benchmarks $(if $(UPDATE),--update-results) $(if $(SMOKE),--smoke)

# The tests on every core (pytest-xdist), a running count ([ n/total]) and the 15 slowest at the end. Within 4 GB of
# memory per worker. Two tiers are left out (pyproject.toml's markers): `make test-slow` runs the slow tier (the
# subprocess builds, the long distributed and trainer runs, the interpreter's biggest cases), `make test-bigmem` the
# one test that needs 16 GB (a CPU tensor of more than 2^31 elements). CI runs all three.
test: setup
	$(PYTHON) -m pytest -n $(JOBS) -m "not bigmem and not slow" --durations=15

test-slow: setup
	$(PYTHON) -m pytest -n $(JOBS) -m "slow and not bigmem" --durations=15

test-bigmem: setup
	$(PYTHON) -m pytest -m bigmem --durations=15

lint:
	$(PYTHON) -m ruff check .

# The GPU machines' stack (torch 2.11.0 CUDA 13.0 build, Triton 3.6.0) in .venv/gpu-stack: real extension build for
# sm_80/sm_90, Triton compile check, the test suite on the CPU (scripts/gpu_stack.sh; ~5 GB once, then minutes).
gpu-stack:
	bash scripts/gpu_stack.sh

# On a machine with an NVIDIA GPU (scripts/gpu_evidence.sh, docs/guides/gpu-evidence.md), two commands of at most 8
# minutes each from a fresh checkout, results in benchmarks/results/gpu/<GPU name>/. The first (PART=1) brings back
# the most valuable evidence first: fastasam._C built for this GPU alone while the Triton kernel tests run, --check, the
# CUDA kernel tests with opcheck and the CUDA-graph replay, the ResNet-50 fp32 step time, compute-sanitizer memcheck;
# PART=2 the rest (bf16, end to end, racecheck, ViT/GPT-2, the torch.compile baseline). DRY_RUN=1, on any machine:
# the plan, a line per step with its cap, what each test selection collects, the caps' sum.
PART ?= 1
gpu-evidence:
	PYTHON=$(PYTHON) bash scripts/gpu_evidence.sh part$(PART) $(if $(DRY_RUN),--dry-run)

# The documentation site (mkdocs.yml, docs/) into build/site; --strict: a broken link, page or docstring fails it.
# Only the docs extra's packages are installed, when missing (no torch: the API pages read the sources).
.PHONY: docs
docs:
	@$(PYTHON) scripts/setup_env.py --extras docs --requirements-only
	$(PYTHON) -m mkdocs build --strict -d build/site
