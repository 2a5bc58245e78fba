# `make demo` and `make test` each set up .venv on first use, with exactly the versions in uv.lock.
# Only Python 3.11+ and make are needed: uv itself (pinned below) is installed by pip into .uv/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
#: the uv that reads and writes uv.lock (a newer uv may rewrite the lock's format: bump it on purpose)
UV_VERSION := 0.13.10
UV_HOME := .uv
UV := $(UV_HOME)/bin/uv
# never download an interpreter: the machine's $(PYTHON) is the one
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
STAMP := $(VENV)/.installed-dev
DEMO_STAMP := $(VENV)/.installed-demo
LATEST := .venv-latest

.PHONY: demo test check lint typecheck bench lock test-latest clean

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'

# the demo needs only tierq[demo] (the worker, the simulator, the API, a bundled redis-server)
$(DEMO_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --python $(PYTHON) --extra demo
	rm -f $(STAMP)
	touch $(DEMO_STAMP)

# tests, lint and the bench: everything (tierq[dev])
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --python $(PYTHON) --extra dev
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/tierq demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# the quick tier: lint, types and the tests not marked slow (real Redis, real workers), under 2 minutes
check: lint typecheck
	$(BIN)/pytest -m "not slow" -n 2 --dist loadgroup

# everything: what CI runs (.ci/run)
test: lint typecheck
	$(BIN)/pytest -n 2 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python -m bench all

# re-resolve uv.lock to the newest releases pyproject.toml allows; commit it with what it changed
lock: | $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

# the suite against today's newest releases (not the lock), in $(LATEST): drift seen before it bites
test-latest: | $(UV)
	rm -rf $(LATEST)
	$(UV) venv --quiet --python $(PYTHON) $(LATEST)
	$(UV) pip install --quiet --refresh --python $(LATEST)/bin/python --upgrade -e '.[dev]'
	$(LATEST)/bin/python -c "import anthropic, celery, kombu, redis; print('newest:', 'anthropic', anthropic.__version__, 'celery', celery.__version__, 'kombu', kombu.__version__, 'redis', redis.__version__)"
	$(LATEST)/bin/pytest -p no:cacheprovider -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) $(UV_HOME) $(LATEST) .pytest_cache .mypy_cache .ruff_cache
