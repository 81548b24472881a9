# The two Quickstart commands of README.md: `make demo` and `make test`.
# Both install what is missing into the current Python environment first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch that this project's CI machines keep on disk. Installed only when no
# torch is importable: a user's own torch (e.g. a CUDA build) is always kept.
TORCH_CPU_PIN ?= torch==2.13.0
# Quoted: an unquoted ">=" would be a shell redirection.
BUILD_REQUIREMENTS := "setuptools>=64" wheel "pybind11>=2.12" ninja "cmake>=3.18"

.PHONY: install demo test bench info

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_CPU_PIN)"
	$(PIP) install --quiet $(BUILD_REQUIREMENTS)
	@# CUTLASS / CuTe headers (from the pinned nvidia-cutlass wheel, unpacked into build/cutlass)
	@# for the CUDA build's Hopper GEMM and CI's nvcc compile check. Not fatal: a CPU build does
	@# not need them (a CUDA build then leaves that one kernel out and says so).
	$(PYTHON) cmake/cutlass_headers.py fetch || echo "warning: no CUTLASS headers fetched"
	$(PIP) install --quiet --no-build-isolation ".[test,train]"

# The main job: the complete ShapesWorld toy migration (l2p-train with no arguments).
demo: install
	$(PYTHON) -m l2p.train

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m pytest bench --benchmark-enable --benchmark-columns=min,median,max,rounds -q

info:
	$(PYTHON) -m l2p info
