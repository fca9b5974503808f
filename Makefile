# Every target creates the uv environment first when it is missing (only Python and pip are assumed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attn2conv-installed
UV     := $(PYTHON) -m uv
# Fast suite on the CI machine's two cores; ATTN2CONV_TEST_WORKERS=0 runs in one process.
WORKERS ?= $(or $(ATTN2CONV_TEST_WORKERS),2)

.PHONY: demo test test-slow bench env clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	@test -x $(PY) || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) -e '.[dev]'
	@touch $@

env: $(STAMP)

# The main job on a real model: timm DeiT-S -> passes -> ONNX -> verifier certificate, report printed.
demo: $(STAMP)
	@mkdir -p out
	$(VENV)/bin/attn2conv convert timm:deit_small_patch16_224 --target trt-safe \
		-o out/deit_small_trt_safe.onnx --report out/deit_small_report.json

test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	@mkdir -p benchmarks/results
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf out .pytest_cache build *.egg-info
