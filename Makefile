# Every target creates .venv itself when it is missing, so a fresh clone needs only `make demo`
# and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEV    := $(VENV)/.dev-installed
BENCHX := $(VENV)/.bench-installed
BENCH  ?= quick
# The demo's data and its own Dagster instance (`make ui` shows what `make demo` ran).
DEMO_DATA := $(abspath $(or $(MEMSAFE_DEMO_DATA),.memsafe_data))

.PHONY: demo test ui browser check-install bench lint format clean constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Installs are pinned by constraints.txt (the versions the suite last passed with); pyproject.toml
# keeps the ranges a user's own install resolves within.
$(DEV): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

$(BENCHX): pyproject.toml constraints.txt | $(DEV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,bench]"
	touch $@

demo: $(DEV)
	MEMSAFE_DEMO_DATA=$(DEMO_DATA) $(BIN)/memsafe demo

test: $(DEV)
	$(BIN)/python -m pytest -q

# The demo is a dg project ([tool.dg] in pyproject.toml): `dg dev` serves it (workspace.yaml
# keeps `dagster dev -w workspace.yaml` working too). UI_PORT=3001 make ui for another port.
UI_PORT ?= 3000
ui: $(DEV)
	MEMSAFE_DEMO_DATA=$(DEMO_DATA) $(BIN)/memsafe demo --prepare
	MEMSAFE_DEMO_DATA=$(DEMO_DATA) DAGSTER_HOME=$(DEMO_DATA)/dagster_home \
		DAGSTER_DG_UPDATE_CHECK_ENABLED=0 $(BIN)/dg dev --host 127.0.0.1 --port $(UI_PORT)

# Headless Chromium for the web-UI tests: Debian's package (needs root, as on CI). Without it
# those tests skip, loudly, and the rest of the suite runs.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "make browser: could not install chromium; the web-UI tests will skip"

bench: $(BENCHX)
	$(BIN)/python -m benchmarks.run --suite $(BENCH)

lint: $(DEV)
	$(BIN)/ruff check memsafe_dagster tests benchmarks
	$(BIN)/ruff format --check memsafe_dagster tests benchmarks

format: $(DEV)
	$(BIN)/ruff check --fix memsafe_dagster tests benchmarks
	$(BIN)/ruff format memsafe_dagster tests benchmarks

# The dependency ranges as a user meets them: the built wheel (not editable) and dagster-dg-cli,
# resolved by pip without constraints in a fresh venv; then dg lists memsafe's components.
check-install:
	rm -rf .venv-install .dist-install
	$(PYTHON) -m venv .venv-install
	.venv-install/bin/python -m pip install -q --upgrade pip
	.venv-install/bin/python -m pip wheel -q --no-deps -w .dist-install .
	.venv-install/bin/python -m pip install -q .dist-install/memsafe_dagster-*.whl dagster-dg-cli
	.venv-install/bin/python -m pip check
	cd / && DAGSTER_DG_UPDATE_CHECK_ENABLED=0 $(CURDIR)/.venv-install/bin/dg list components \
		| grep -E "memsafe_dagster\.(MergeComponent|MemoryResourceComponent)"
	rm -rf .venv-install .dist-install

# Re-resolve every dependency in a fresh venv and write what it installed to constraints.txt.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q --upgrade pip
	.venv-constraints/bin/python -m pip install -q -e ".[dev,bench]"
	{ sed -n '1,3p' constraints.txt; .venv-constraints/bin/python -m pip freeze --exclude-editable \
		| grep -v '^memsafe'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) .memsafe_data .pytest_cache .venv-install .dist-install
