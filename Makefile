# edgeterm developer commands. Everything installs itself into .venv on first use.
#   make run    - edgeterm in front of a demo upstream, with etc/edgeterm.toml (Ctrl-C stops both)
#   make test   - the test suite (unit + integration with real processes)
#   make lint   - ruff and mypy

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CERTS := etc/certs

.PHONY: run test test-unit test-integration lint fmt venv certs clean system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $@

certs: $(CERTS)/localhost.pem

$(CERTS)/localhost.pem: | $(STAMP)
	$(PY) -m edgeterm.selfsigned $(CERTS) localhost

# The demo upstream runs in the background for as long as edgeterm runs in the foreground.
run: $(STAMP) certs
	@$(PY) -m edgeterm.demo_upstream --bind 127.0.0.1:8080 & up=$$!; \
	trap 'kill $$up 2>/dev/null; wait $$up 2>/dev/null' EXIT; \
	trap 'true' INT; \
	echo "try: curl --cacert $(CERTS)/ca.pem https://localhost:8443/"; \
	$(VENV)/bin/edgeterm start --foreground -c etc/edgeterm.toml

# System tools the integration tests drive (openssl s_client, curl). Installed by .ci/run;
# here we only say what is missing.
system-deps:
	@missing=""; for t in openssl curl; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "missing system tools:$$missing (apt-get install$$missing)"; exit 1; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# mypy cannot follow the package-dir mapping (workers/ -> edgeterm.workers), so it checks a
# tree of symlinks laid out as the installed package is.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf .typecheck && mkdir -p .typecheck/edgeterm
	cp -as "$(CURDIR)/edgeterm/." .typecheck/edgeterm/
	ln -s "$(CURDIR)/workers" .typecheck/edgeterm/workers
	ln -s "$(CURDIR)/supervisor" .typecheck/edgeterm/supervisor
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p edgeterm

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

# Benchmarks (issue 5; see loadtest/ and BENCHMARKS.md): edgeterm against haproxy and nginx,
# loopback only. Needs haproxy, nginx with libnginx-mod-stream, cc and libssl-dev; installs none
# of them and says which apt package is missing.
#   make bench        - every scenario, every target, 3 interleaved rounds (about 22 minutes);
#                       raw results in loadtest/results/, charts in loadtest/charts/
#   make bench-smoke  - CI, about 80 s: edgeterm against haproxy, 2 rounds; fails on a gross
#                       regression (CPU per full handshake > 1.5x haproxy's in every round)
#                       or any client error
# BENCH_ARGS adds options, e.g. BENCH_ARGS="--edgeterm-src HEAD" measures the last commit
# (a frozen snapshot) instead of the work tree that others may be editing meanwhile.
BENCH_ARGS ?=
.PHONY: bench bench-smoke

bench: $(STAMP)
	$(PY) -m pip install -q -r loadtest/requirements.txt
	$(PY) -m loadtest all --rounds 3 --duration 6 --charts loadtest/charts $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(PY) -m loadtest --smoke

# Soak (issue 9; see loadtest/soak.py and RELIABILITY.md): a mixed load with a reload every
# minute for up to 10 minutes; RSS and open descriptors of every edgeterm process sampled each
# second; fails on any failed connection or growth beyond noise. Not part of `make test`.
#   make soak                      - 10 minutes
#   make soak SOAK_ARGS="--minutes 5"
.PHONY: soak
SOAK_ARGS ?=

soak: $(STAMP)
	$(PY) -m loadtest.soak $(SOAK_ARGS)
