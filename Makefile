# pathsmc: the two commands of the README (`make demo`, `make test`) and friends.
# Idempotent: the venv and the build are redone only when their inputs change.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.stamp-deps
BUILT  := $(VENV)/.stamp-build
SRCS   := $(shell find csrc -type f) CMakeLists.txt pyproject.toml
PIP    := $(VPY) -m pip install --disable-pip-version-check -q
# Packages the build and the tests need; only installed when not importable (GPU hosts are offline).
NEEDED := scikit_build_core pybind11 ninja pytest numpy matplotlib tqdm

.PHONY: demo test build bench lint clean

demo: $(BUILT)
	$(VENV)/bin/pathsmc demo

test: $(BUILT)
	$(VPY) -m pytest -q tests

build: $(BUILT)

bench: $(BUILT)
	$(VPY) bench/run.py

lint: $(DEPS)
	$(VPY) -m ruff check python tests bench

# A venv that reuses an importable torch (e.g. a GPU host's own CUDA torch), else the CPU wheel.
$(DEPS):
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "make: reusing torch from $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@for m in $(NEEDED); do $(VPY) -c "import $$m" 2>/dev/null || missing="$$missing $$m"; done; \
	 if [ -n "$$missing" ]; then \
	   echo "make: installing$$missing"; \
	   $(PIP) scikit-build-core pybind11 ninja pytest numpy matplotlib tqdm ruff; \
	 fi
	@$(VPY) -c "import cmake" 2>/dev/null || cmake --version | grep -q "version [4-9]" || $(PIP) "cmake>=4"
	@touch $@

$(BUILT): $(DEPS) $(SRCS)
	$(PIP) --no-build-isolation --no-deps -e .
	@touch $@

clean:
	rm -rf build $(BUILT)
