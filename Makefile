# The two commands: `make demo` (set-up + the main job) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 67108864
export MALLOC_TOP_PAD_ ?= 67108864

.PHONY: install lint test test-unit test-triton triton-env triton-env-soft demo models results clean

# torch is pinned to the CPU build that pip finds locally (see ../shared/ENVIRONMENT.md): a plain
# `torch` would pull several GB of CUDA wheels. CPU machines get `onnxruntime`; the GPU image
# installs `onnxruntime-gpu` instead (the two packages overwrite each other).
$(STAMP): pyproject.toml clients/python/pyproject.toml protos/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e protos/python -e clients/python -e '.[cpu,test]'
	touch $(STAMP)

install: $(STAMP)

# The Triton tests (tests/test_triton*.py) run a real `tritonserver` from .venv-triton (nvidia-pytriton's
# binary; scripts/triton-env.sh, quick once made). `make test` runs them too; they skip, printing why,
# only where that binary cannot run (here: if the venv could not be made). `make test-triton` insists.
# Lint, format and types (ruff and mypy, configured in pyproject.toml): seconds, so before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	scripts/typecheck.sh

# The two virtual environments install side by side (-j2: each pip run is mostly one core), then the tests.
# pytest-xdist: TEST_WORKERS processes, each test file whole on one of them (its module fixtures made once), the
# session fixtures (exported bundles, the shared servers) once per worker. Run serially, the suite leaves one of 2
# cores idle much of the time (pytest waits on the servers it started); a second worker uses it.
TEST_WORKERS ?= 2
test:
	$(MAKE) --no-print-directory -j2 --output-sync=target lint triton-env-soft
	scripts/browser-env.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

triton-env-soft:
	scripts/triton-env.sh || echo "make test: .venv-triton could not be prepared; the Triton tests will skip and say why"

# The fast tier alone (about 45 s, 129 tests): families, heads, validation, state, images, store, batcher, results, inner loops; no export, no server.
test-unit: install
	$(PY) -m pytest -m unit

triton-env:
	scripts/triton-env.sh

test-triton: install triton-env
	$(PY) -m pytest tests/test_triton*.py

# Exports the flagship bundles if missing, starts `fewshot serve` (with the web console), runs the client SDK
# through 40 test tasks per row (FULL=1: RESULTS.md's 600; KEEP=1: the server stays up afterwards).
demo: install
	$(VENV)/bin/fewshot demo $(if $(FULL),--tasks 600) $(if $(KEEP),--keep)

# Retrain the shipped backbones (hours on 2 CPU cores), package them, then re-measure RESULTS.md.
models: install
	scripts/train-shipped.sh
	scripts/package-shipped.sh

results: install
	$(PY) -m fewshot.tools.results --tasks 600

clean:
	rm -rf $(VENV) .venv-triton .cache .pytest_cache .mypy_cache .ruff_cache
