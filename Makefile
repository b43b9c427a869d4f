# `make install` creates .venv with vlm and a torch/torchvision pair known to import together;
# override with e.g. `make install TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint docs demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, timm, open_clip, openslide, faiss; print('vlm environment ok: torch', torch.__version__)"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/vlm demo --out demo_out

# The docs site (docs/ + mkdocs.yml) into site/; --strict: any warning (broken link or anchor, a page left out
# of the nav, an unreadable docstring) fails. Never add -q: it hides the warnings, and strict then passes.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check vlm tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out site
