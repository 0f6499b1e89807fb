# The two commands: `make run` (the chat on the embedded default) and `make test` (the whole
# suite against throwaway PostgreSQL, Redis, S3 (moto), ClamAV and Chromium).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.run-installed
DEV_STAMP := $(VENV)/.dev-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

# Lint and type checks import the settings, which need a key outside DEBUG.
CHECK_ENV := env -u DATABASE_URL -u REDIS_URL -u AWS_STORAGE_BUCKET_NAME DJANGO_DEBUG=1

.PHONY: run test lint fix bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUN_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(RUN_STAMP) $@

venv: $(DEV_STAMP)

run: $(RUN_STAMP)
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(BIN)/python manage.py migrate --noinput
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(BIN)/python manage.py seed_demo
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(BIN)/daphne -b $(HOST) -p $(PORT) chatapp.asgi:application

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(CHECK_ENV) $(BIN)/mypy .
	$(CHECK_ENV) CHATAPP_DATA_DIR=$$(mktemp -d) $(BIN)/python manage.py makemigrations --check --dry-run

fix: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(DEV_STAMP)
	$(BIN)/python scripts/testenv.py ensure
	$(MAKE) --no-print-directory lint
	@echo "== Suite on real PostgreSQL, Redis, S3 (moto), ClamAV and Chromium =="
	$(BIN)/python scripts/testenv.py run -- env CHATAPP_TESTING=1 CHATAPP_REQUIRE_SERVICES=1 \
		$(BIN)/pytest --ignore=tests/test_realtime_live.py --ignore=tests/test_faults_live.py $(PYTEST_ARGS)
	@echo "== The socket protocol again on channels-redis' core layer (the default is pub/sub) =="
	$(BIN)/python scripts/testenv.py run -- env CHATAPP_TESTING=1 CHATAPP_REQUIRE_SERVICES=1 \
		CHATAPP_CHANNEL_LAYER=channels_redis.core.RedisChannelLayer $(BIN)/pytest tests/test_realtime_protocol.py $(PYTEST_ARGS)
	@echo "== Multi-process real-time and fault tests, on their own fresh PostgreSQL and Redis =="
	$(BIN)/python scripts/testenv.py run -- env CHATAPP_TESTING=1 CHATAPP_REQUIRE_SERVICES=1 \
		$(BIN)/pytest tests/test_realtime_live.py tests/test_faults_live.py $(PYTEST_ARGS)
	@echo "== Smoke suite on the embedded default (SQLite, in-memory layer, local files) =="
	env -u DATABASE_URL -u REDIS_URL -u AWS_STORAGE_BUCKET_NAME -u AWS_S3_ENDPOINT_URL \
		CHATAPP_TESTING=1 CHATAPP_DATA_DIR=$$(mktemp -d) $(BIN)/pytest -m smoke $(PYTEST_ARGS)

bench: $(DEV_STAMP)
	$(BIN)/python scripts/testenv.py ensure
	$(BIN)/python scripts/testenv.py run -- $(BIN)/python -m bench.run
	$(BIN)/python scripts/testenv.py run -- $(BIN)/python -m bench.replay
	$(BIN)/python -m bench.images

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache
