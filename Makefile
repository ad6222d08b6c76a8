# `make demo` and `make test` set everything up on first use and are quick afterwards.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := 2.13.0
DEMO_OUTPUT ?= demo_output

.PHONY: demo test test-numerics lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffusers-ext demo --output $(DEMO_OUTPUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -n 2 --dist loadfile

# The effect tests (marker `effect`) again under other numerics and another training seed: two threads per worker,
# torch's deterministic algorithms with SSE4.2-class kernels, and training seed 1 (see tests/conftest.py).
test-numerics: $(STAMP)
	DIFFUSERS_EXT_TEST_THREADS=2 $(PY) -m pytest -m effect -p no:cacheprovider
	DIFFUSERS_EXT_DETERMINISTIC=1 ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
		$(PY) -m pytest -m effect -p no:cacheprovider -n 2 --dist loadfile
	DIFFUSERS_EXT_TEST_SEED=1 $(PY) -m pytest -m effect -p no:cacheprovider -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/sampler_accuracy.py --output benchmarks/results

clean:
	rm -rf $(VENV) $(DEMO_OUTPUT) build dist *.egg-info
