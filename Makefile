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

.PHONY: install browser test test-fast lint docs demo clean

install: $(STAMP) browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, timm, open_clip, openslide, faiss; print('vlm environment ok: torch', torch.__version__)"
	touch $(STAMP)

# The viewer tests drive a real headless Chromium. `make install` installs the system package where it can (apt-get,
# as root or through sudo), else prints what to run; without a browser those tests skip, saying why (they fail
# under CI=true).
CHROMIUM := $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
CHROMIUM_HELP := Chromium not found and not installed: the browser tests of tests/test_serve.py will skip. Install it \
	with your system's package manager, e.g. 'sudo apt-get install chromium' (Debian), 'sudo dnf install chromium' \
	(Fedora), 'brew install --cask chromium' (macOS), so that 'chromium' is on PATH; then run make test.

browser:
ifeq ($(CHROMIUM),)
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Chromium for the browser tests: apt-get install chromium"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || echo "$(CHROMIUM_HELP)"; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		echo "Installing Chromium for the browser tests: sudo apt-get install chromium"; \
		{ sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
			|| echo "$(CHROMIUM_HELP)"; \
	else \
		echo "$(CHROMIUM_HELP)"; \
	fi
else
	@echo "Chromium for the browser tests: $(CHROMIUM)"
endif

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
	$(BIN)/ruff check vlm tests bench docs/hooks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out site
