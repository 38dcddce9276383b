# giblet: `make demo` sets everything up and runs the demo; `make test` runs the tests.
#
#   make install   .venv with pinned requirements (torch 2.14.1) + the native extension
#                  (TORCH=cpu: torch 2.13.0's CPU build instead, ~1 GB of venv instead of ~6.6 GB)
#   make build     rebuild the extension in place (incremental: seconds after editing one kernel)
#   make test      pytest + the native ctest suite (CPU; CUDA tests skip without a GPU)
#   make bench     `giblet bench` (op cases at Sherlock sizes + the training step), then the pytest-benchmark suite (benchmarks/)
#   make demo      `giblet demo`: synth a tiny dataset -> validate -> train on the CPU -> evaluate
#
# GIBLET_CUDA=0 builds CPU kernels only (fast local iteration); by default the
# CUDA kernels are compiled too when torch has CUDA and nvcc is found.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOBS ?= $(shell nproc)
export MAX_JOBS ?= $(JOBS)
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
# The venv's tools first: ninja (for setup.py and CMake) comes from requirements.txt.
export PATH := $(abspath $(BIN)):$(PATH)
# cuda: requirements.txt as pinned (torch 2.14.1, a CUDA 13.0 build of ~5.5 GB with its nvidia
# libraries, which also runs on the CPU). cpu: torch 2.13.0's CPU build, for a machine short of disk;
# the extension then holds CPU kernels only. PyPI's torchaudio links torch's CUDA libraries, so its optional
# C++ libraries cannot load beside the CPU build and are removed: torchaudio imports without them, and what
# encodec uses of it (resampling, spectrograms) is Python on torch.
TORCH ?= cuda
TORCH_CPU_PIN := torch==2.13.0

.PHONY: install build test test-python test-native bench demo cuda-compile clean

install: $(VENV)/.installed build

$(VENV)/.installed: requirements.txt setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	case "$(TORCH)" in \
	  cuda) $(BIN)/pip install -r requirements.txt ;; \
	  cpu) grep -v '^torch==' requirements.txt > $(VENV)/requirements-cpu.txt && \
	       $(BIN)/pip install "$(TORCH_CPU_PIN)" -r $(VENV)/requirements-cpu.txt && \
	       rm -f $(VENV)/lib/python*/site-packages/torchaudio/lib/*.so ;; \
	  *) echo "TORCH=$(TORCH): expected cuda (torch 2.14.1, the default) or cpu (torch 2.13.0's CPU build)" >&2; exit 2 ;; \
	esac
	GIBLET_SKIP_EXT=1 $(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.installed
	$(BIN)/python setup.py build_ext --inplace

test: test-python test-native

test-python: build
	$(BIN)/python -m pytest tests

test-native: $(VENV)/.installed
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j $(JOBS)
	ctest --test-dir build/cmake --output-on-failure

bench: build
	$(BIN)/giblet bench --case ops --case train_step --json build/bench.json
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

DEMO_DIR ?= demo

demo: build
	$(BIN)/giblet demo --out $(DEMO_DIR)

# Compile the CUDA kernels even without a GPU (CI has nvcc but no GPU).
cuda-compile: $(VENV)/.installed
	GIBLET_CUDA=1 $(BIN)/python setup.py build_ext --inplace

clean:
	rm -rf build giblet/_C*.so
