# pathsmc: the two commands of the README (`make demo`, `make test`) and friends.
# Idempotent: the venv and the build are redone only when their inputs change.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.stamp-deps
BUILT  := $(VENV)/.stamp-build
SRCS   := $(shell find csrc -type f) CMakeLists.txt pyproject.toml
PIP    := $(VPY) -m pip install --disable-pip-version-check -q
# Packages the build and the tests need, and optional ones (plots, lint); only the missing ones
# are installed (GPU hosts are offline: a missing optional package only warns there).
NEEDED   := scikit_build_core pybind11 ninja pytest numpy tqdm
OPTIONAL := matplotlib ruff rich
# The real-model clients (pathsmc.integrations): installed when missing; tests that need one
# skip with a reason where it cannot be installed (offline GPU hosts carry their wheels).
EXTRAS   := diffusers transformers safetensors sklearn

# The CUDA torch that `make cuda-build` compiles against; another version gets its own venv and
# build folder, e.g. `make cuda-build TORCH_CUDA_VERSION=2.11.0` (the GPU hosts' torch).
TORCH_CUDA_VERSION ?= 2.14.1
CUDA_VENV := .venv-cuda$(if $(filter 2.14.1,$(TORCH_CUDA_VERSION)),,-$(TORCH_CUDA_VERSION))
CUDA_VPY  := $(CUDA_VENV)/bin/python
CUDA_ARCH ?= 9.0

.PHONY: demo test build bench lint clean cuda-build

demo: $(BUILT)
	$(VENV)/bin/pathsmc demo
	$(VENV)/bin/pathsmc demo digits --quick

test: $(BUILT)
	$(VPY) -m pytest -q tests

build: $(BUILT)

bench: $(BUILT)
	$(VPY) bench/run.py

lint: $(DEPS)
	$(VPY) -m ruff check python tests bench tools

# A venv that reuses an importable torch (e.g. a GPU host's own CUDA torch), else the CPU wheel.
# The .pth file adds the host Python's site-packages: when that Python is itself a venv
# (/opt/torch/.venv on the GPU hosts), --system-site-packages alone would not see its torch.
$(DEPS):
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "make: reusing torch from $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	    $(PYTHON) -c "import site, sys; print(chr(10).join(site.getsitepackages()))" \
	      > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_host_site.pth"; \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@for m in $(NEEDED); do $(VPY) -c "import $$m" 2>/dev/null || missing="$$missing $$m"; done; \
	 if [ -n "$$missing" ]; then \
	   echo "make: installing$$missing"; \
	   $(PIP) $$(echo $$missing | sed 's/scikit_build_core/scikit-build-core/') || { \
	     echo "make: cannot install$$missing (offline? carry wheels and pip install them)"; \
	     exit 1; }; \
	 fi
	@for m in $(OPTIONAL); do $(VPY) -c "import $$m" 2>/dev/null || opt="$$opt $$m"; done; \
	 if [ -n "$$opt" ]; then \
	   $(PIP) $$opt || echo "make: optional$$opt not installed (no plots / no lint)"; \
	 fi
	@for m in $(EXTRAS); do $(VPY) -c "import $$m" 2>/dev/null && continue; \
	   $(PIP) $$(echo $$m | sed 's/sklearn/scikit-learn/') 2>/dev/null || \
	     echo "make: extra $$m not installed (its tests skip; offline hosts: tools/fetch_gpu_wheels.sh)"; \
	 done
	@$(VPY) -c "import cmake" 2>/dev/null || cmake --version | grep -q "version [4-9]" || $(PIP) "cmake>=4"
	@touch $@

$(BUILT): $(DEPS) $(SRCS)
	$(PIP) --no-build-isolation --no-deps -e .
	@touch $@

# CUDA variant on a machine without a GPU: build against the CUDA torch wheel on disk, import
# it, and check that every op has a CUDA kernel registered (CI runs this after `make test`).
# The venv takes about 4.6 GB: torch and its CUDA libraries, without triton.
cuda-build: $(CUDA_VENV)/.stamp-build
	$(CUDA_VPY) tools/check_cuda_build.py

$(CUDA_VENV)/.stamp-deps:
	@test -x $(CUDA_VPY) || $(PYTHON) -m venv $(CUDA_VENV)
	@$(CUDA_VPY) -c "import torch; assert torch.version.cuda; \
	  assert torch.__version__.split('+')[0] == '$(TORCH_CUDA_VERSION)'" 2>/dev/null || { \
	  $(CUDA_VPY) -m pip install --disable-pip-version-check -q --no-deps \
	    torch==$(TORCH_CUDA_VERSION) && \
	  $(CUDA_VPY) tools/cuda_torch_requirements.py > $(CUDA_VENV)/torch-requirements.txt && \
	  $(CUDA_VPY) -m pip install --disable-pip-version-check -q -r $(CUDA_VENV)/torch-requirements.txt; }
	@$(CUDA_VPY) -c "import scikit_build_core, pybind11, ninja, cmake, numpy" 2>/dev/null || \
	  $(CUDA_VPY) -m pip install --disable-pip-version-check -q scikit-build-core pybind11 ninja "cmake>=4" numpy
	@touch $@

$(CUDA_VENV)/.stamp-build: $(CUDA_VENV)/.stamp-deps $(SRCS)
	PATHSMC_CUDA=ON TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH)" $(CUDA_VPY) -m pip install \
	  --disable-pip-version-check -q --no-build-isolation --no-deps \
	  -C build-dir=build/cuda-$(TORCH_CUDA_VERSION) .
	@touch $@

clean:
	rm -rf build $(BUILT) $(CUDA_VENV)/.stamp-build
