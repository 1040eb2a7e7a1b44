# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint bench model golden clean-venv node-client browser genicam plant-tools plant-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The node-opcua test client (tests/opcua_node): the suite talks OPC UA with a stack other than asyncua.
# npm ci again when node_modules is gone (the stamp lives inside it) or the lock file changed.
NODE_CLIENT := tests/opcua_node
NODE_STAMP := $(NODE_CLIENT)/node_modules/.npm-ci-stamp

$(NODE_STAMP): $(NODE_CLIENT)/package-lock.json $(NODE_CLIENT)/package.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

node-client: $(NODE_STAMP)

# The HMI tests drive Debian's Chromium through Playwright (whose own browser download cannot be used here).
# Installed when missing and this is root (CI); otherwise say how, and the browser tests skip (fail in CI).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
		else \
			echo "no /usr/bin/chromium: run 'sudo apt-get install --no-install-recommends chromium' for the HMI browser tests"; \
		fi; \
	fi

# The GenICam tests (tests/test_genicam_wire.py) talk GigE Vision on loopback to Debian's fake camera
# (aravis-tools) through Aravis's bindings (gir1.2-aravis-0.8) and PyGObject, built into the venv against
# Debian's gobject-introspection (the `genicam` extra: not in `dev`, which must install without a C compiler).
# Installed when missing and this is root (CI); otherwise say how, and those tests skip (fail in CI).
ARAVIS_DEBS := aravis-tools gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev pkg-config gcc python3-dev
genicam: $(STAMP)
	@if ! command -v arv-fake-gv-camera-0.8 >/dev/null || ! pkg-config --exists gobject-introspection-1.0 cairo \
		|| [ -z "$$(find /usr/lib -name 'Aravis-0.8.typelib' 2>/dev/null | head -1)" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(ARAVIS_DEBS); \
		else \
			echo "GenICam tests need: sudo apt-get install --no-install-recommends $(ARAVIS_DEBS); make genicam"; \
			exit 0; \
		fi; \
	fi; \
	$(BIN)/python -c "import gi; gi.require_version('Aravis', '0.8')" 2>/dev/null \
		|| $(BIN)/pip install --quiet -e '.[genicam]'

# The plant's MQTT broker and PostgreSQL (the Sparkplug and plant database tests, `make plant-demo`): Debian's
# mosquitto and PostgreSQL 15, run by the tests and the demo in temp folders on loopback, never as services.
# Installed when missing and this is root (CI); otherwise say how, and those tests skip (fail in CI).
PG_BIN := /usr/lib/postgresql/15/bin
plant-tools:
	@missing=""; \
	{ [ -x /usr/sbin/mosquitto ] && command -v mosquitto_passwd >/dev/null; } || missing="$$missing mosquitto"; \
	[ -x $(PG_BIN)/initdb ] || missing="$$missing postgresql-15"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "missing:$$missing: run 'sudo apt-get install --no-install-recommends$$missing' for the plant data tests"; \
		fi; \
	fi

# Two simulated lines on one MQTT broker and one PostgreSQL, each stopped 10 s while they run (sim/plant_demo.py).
plant-demo: $(STAMP) plant-tools
	$(BIN)/sorter plant-demo --config config/sim.yaml --duration 60 --seed 7

demo: $(STAMP)
	$(BIN)/sorter demo --config config/sim.yaml --duration 60 --seed 7

# The suite in its tiers (tests/conftest.py): `fast` first, stopping at its first failure, and only if it
# passed `wire` (real protocol peers on loopback) and `line` (end-to-end runs of the simulated line).
test: $(STAMP) node-client browser genicam plant-tools
	@t0=$$(date +%s); $(BIN)/python -m pytest -q -x -m fast; rc=$$?; \
	echo "fast tier: $$(( $$(date +%s) - t0 )) s"; exit $$rc
	@t0=$$(date +%s); $(BIN)/python -m pytest -q -m wire; wire=$$?; \
	echo "wire tier: $$(( $$(date +%s) - t0 )) s"; \
	t0=$$(date +%s); $(BIN)/python -m pytest -q -m line; line=$$?; \
	echo "line tier: $$(( $$(date +%s) - t0 )) s"; \
	test $$wire = 0 && test $$line = 0

# After a change meant to move the line's figures: write the lockstep run's new golden figures, then review
# the diff of tests/golden/ and commit it with the change.
golden: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_lockstep.py --update-golden

lint: $(STAMP)
	$(BIN)/ruff check sorter sim hw tests
	$(BIN)/mypy sorter sim hw

bench: $(STAMP)
	$(BIN)/sorter bench --config config/sim.yaml

# Retrain the shipped model from simulator renders (needs PyTorch CPU: the `train` extra).
model: $(STAMP)
	$(BIN)/pip install --quiet -e '.[train]'
	$(BIN)/sorter sim dataset --out data/sim-ds --per-class 1000 --seed 1
	$(BIN)/sorter model train --data data/sim-ds --out models/sorter-cnn.onnx --epochs 40 --time-budget 0 --seed 0

clean-venv:
	rm -rf $(VENV)
