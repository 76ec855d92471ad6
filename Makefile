# gpucap developer commands. `make test` is the one CI runs (.ci/run): on a fresh Debian/Ubuntu
# machine it installs what the tests need (Debian's `prometheus` package for promtool and a real
# Prometheus server, `victoria-metrics` for the fleet tests, `chromium` for the HTML report test, tmux,
# pip if missing, the Python test dependencies), then runs the whole suite.
PYTHON ?= python3
# a system Python marked "externally managed" (PEP 668) refuses pip installs outside a venv
PIP_FLAGS := $(shell $(PYTHON) -c "import os, sys, sysconfig; print('--break-system-packages' if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')) else '')" 2>/dev/null)
APT = $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: test deps lint bench golden playground focus-validator

test: deps
	$(PYTHON) -m pytest -q

deps:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing="prometheus"; \
	$(PYTHON) -m pip --version >/dev/null 2>&1 || missing="$$missing python3-pip"; \
	command -v tmux >/dev/null 2>&1 || missing="$$missing tmux"; \
	command -v victoria-metrics >/dev/null 2>&1 || missing="$$missing victoria-metrics"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(APT) update -q && $(APT) install -y -q --no-install-recommends $$missing; \
	  $(if $(filter 0,$(shell id -u)),,sudo) systemctl disable --now prometheus victoria-metrics >/dev/null 2>&1 || true; \
	fi
	$(PYTHON) -m pip install -q $(PIP_FLAGS) -e '.[test]'
	@$(MAKE) --no-print-directory focus-validator

# The FOCUS validator (pyproject extra `focus`) pins numpy<2 and multimethod<1.11: it lives apart in
# build/focus-validator (tests/test_focus.py runs it from there), reinstalled only when the pins change.
FOCUS_DIR := build/focus-validator
focus-validator:
	@pins="$$($(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['focus']))")"; \
	if [ "$$(cat $(FOCUS_DIR)/.pins 2>/dev/null)" != "$$pins" ]; then \
	  echo "installing the FOCUS validator into $(FOCUS_DIR): $$pins"; \
	  rm -rf $(FOCUS_DIR) && $(PYTHON) -m pip install -q $(PIP_FLAGS) --target $(FOCUS_DIR) $$pins \
	    && echo "$$pins" > $(FOCUS_DIR)/.pins; \
	fi

lint:
	$(PYTHON) -m ruff check agent collectors tests bench scripts

golden:
	GPUCAP_UPDATE_GOLDEN=1 $(PYTHON) -m pytest -q tests/test_golden.py

bench:
	$(PYTHON) bench/run.py

# Prometheus with the chart's alert rules scraping two simulated nodes at 120x (Ctrl-C stops it)
playground:
	$(PYTHON) -m agent.cli playground
