# Two commands on a fresh Debian machine (as root): `make run` and `make test`.
# Plain POSIX sh recipes; GNU make 4 tested.

PYTHON      ?= python3
VENV        := .venv
STAMP       := $(VENV)/.installed
CONFIG      ?= config/sbc.toml
PYTEST_ARGS ?= -q -ra
# Root runs apt-get directly; anyone else goes through sudo when it exists.
SUDO        := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
# binary:Debian package of each peer the interop tests drive.
PEERS       := sipp:sip-tester kamailio:kamailio baresip:baresip-core tshark:tshark \
               iptables:iptables sipsak:sipsak ip:iproute2 linphonec:linphone-cli sox:sox \
               chromium:chromium chromedriver:chromium-driver \
               rtpengine:rtpengine-daemon redis-server:redis-server
# The install compiles the sans-I/O hot path with mypyc (setup.py, README "Compiled build"),
# or installs pure Python when it cannot (no gcc or python3-dev, SBC_PURE_PYTHON=1).
PIP_INSTALL := $(VENV)/bin/pip install --disable-pip-version-check -q -e '.[test]'

.PHONY: all venv certs run peers test lab lint bench clean distclean

all: venv

# Also reinstalls when a compiled module's source changed since it was compiled (or the
# compiled build is gone, `make clean`): sbc.compiled --check says so.
venv: $(STAMP)
	@$(VENV)/bin/python -m sbc.compiled --check || { $(PIP_INSTALL) && $(VENV)/bin/python -m sbc.compiled; }

# Reinstalls when pyproject.toml or setup.py changes. gcc and the Python headers are
# installed for the compiled build when missing; without them it is pure Python.
$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(VENV)/bin/python ]; then \
	  if ! command -v $(PYTHON) >/dev/null 2>&1 || ! $(PYTHON) -m venv $(VENV); then \
	    rm -rf $(VENV); \
	    echo "installing Debian packages: python3 python3-venv python3-pip"; \
	    $(SUDO) apt-get update && $(APT_INSTALL) python3 python3-venv python3-pip && \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@if [ -z "$$SBC_PURE_PYTHON" ] || [ "$$SBC_PURE_PYTHON" = 0 ]; then \
	  missing=""; \
	  command -v gcc >/dev/null 2>&1 || missing="gcc"; \
	  inc=$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	  [ -f "$$inc/Python.h" ] || missing="$$missing python3-dev"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages (to compile the hot path):$$missing"; \
	    { $(SUDO) apt-get update && $(APT_INSTALL) $$missing; } \
	      || echo "could not install$$missing: sbc installs as pure Python"; \
	  fi; \
	fi
	$(PIP_INSTALL)
	@$(VENV)/bin/python -m sbc.compiled
	@touch $@

# Development CA, server and client certificates; private keys stay out of git.
certs: venv
	@[ -f certs/server.pem ] || $(VENV)/bin/sbc gen-certs --out certs --force

run: venv certs
	exec $(VENV)/bin/sbc run --config $(CONFIG)

peers:
	@missing=""; \
	for p in $(PEERS); do \
	  bin=$${p%%:*}; pkg=$${p#*:}; \
	  command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || [ -x /sbin/$$bin ] \
	    || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update && $(APT_INSTALL) $$missing; \
	fi

# Then the sans-I/O unit tests again with the compiled modules imported from their .py
# sources (the fallback must keep working).
test: venv peers certs
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
	SBC_PURE_PYTHON=1 $(VENV)/bin/python -m pytest -q -ra tests/ --ignore=tests/interop

# The docker-compose lab (docker/) rebuilt with network namespaces: alice and bob behind a
# kernel NAT register over TLS, call each other with SRTP, the audio is checked; a report.
# Needs root; bounded (90 s) and torn down whatever happens. The lab makes its own
# certificates, as the SBC container does.
lab: venv peers
	$(VENV)/bin/python -m tests.interop.lab

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: venv peers
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[bench]'
	$(VENV)/bin/python bench/parse.py --out docs/performance.md
	$(VENV)/bin/python bench/register.py --out docs/performance.md
	$(VENV)/bin/python bench/calls.py --out docs/performance.md
	$(VENV)/bin/python bench/overload.py --out docs/performance.md
	$(VENV)/bin/python bench/media.py --out docs/performance.md
	$(VENV)/bin/python bench/transcode.py --out docs/performance.md
	$(VENV)/bin/python bench/webrtc.py --out docs/performance.md
	$(VENV)/bin/python bench/engines.py --out docs/performance.md

# Also the compiled extensions (built in place next to their sources) and their hashes.
clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache .mypy_cache sbc/_compiled_hashes.json
	find sbc \( -name '*.so' -o -name '*.pyd' \) -type f -delete
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Also the virtualenv and the generated certificates.
distclean: clean
	rm -rf $(VENV)
	rm -f certs/*.pem certs/*.key
