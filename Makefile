# gpucap developer commands. `make test` is the one CI runs (.ci/run): it installs what the
# tests need on a fresh Debian/Ubuntu machine (Python deps, and Debian's `prometheus` package for
# promtool and a real Prometheus server when missing), then runs the whole suite.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: test deps lint bench golden

test: deps
	$(PYTHON) -m pytest -q

deps:
	$(PIP) install -q -e '.[test]'
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing Debian's prometheus package (promtool + server)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q prometheus; \
	  $$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; }

lint:
	$(PYTHON) -m ruff check agent collectors tests bench scripts

golden:
	GPUCAP_UPDATE_GOLDEN=1 $(PYTHON) -m pytest -q tests/test_golden.py

bench:
	$(PYTHON) bench/run.py
