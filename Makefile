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

# Debian packages the tests use to make real speech (espeak-ng, sox)
TEST_PACKAGES := espeak-ng sox

.PHONY: install install-local system-deps test demo bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[test,lint,silero]' $(EDITABLE)
	touch $@

# The offline pipeline's libraries: torch pinned to the CPU build this machine has, and
# openai-whisper without its 1 GB triton dependency (useless on CPU).
install-local: $(LOCAL_STAMP)

$(LOCAL_STAMP): $(STAMP)
	$(PIP) install -q -e '.[local]' $(EDITABLE)
	$(PIP) install -q --no-deps 'openai-whisper==20250625'
	touch $@

system-deps:
	@missing=""; for tool in $(TEST_PACKAGES); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "warning: missing$$missing (sudo apt-get install$$missing); speech tests will be skipped (they fail under CI=true)"; \
	  fi; \
	fi

test: install system-deps
	$(BIN)/python -m pytest

demo: install
	$(BIN)/ai-agent demo

bench: install
	@set -e; for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script; done

lint: install
	$(BIN)/ruff check twisted_agent twisted tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f twisted/plugins/dropin.cache
