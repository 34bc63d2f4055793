# harv-train: `make demo` trains on the bundled demo data, `make test` runs the test suite.
# Both create the virtual environment (.venv) and install the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

DEMO_DATA ?= data/demo
DEMO_SET := --set model_name=efficientnet_lite0 --set data_dir=$(DEMO_DATA) --set classes=null \
            --set artifacts_dir=artifacts/demo --set registered_model_name=harv-train-demo

.PHONY: install demo demo-data train test clean clean-cache mlflow-ui server worker deploy mlflow-server

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
	  || { echo "error: harv-train needs Python 3.11 (the lock is for it); $(PYTHON) is $$($(PYTHON) -V 2>&1): run make PYTHON=python3.11 ..." >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@

demo-data: install
	$(PY) -m harv_train.demo_data $(DEMO_DATA)

# ARGS: more options for the demo run, e.g. make demo ARGS=--resume
demo: demo-data
	$(PY) flows/train_flow.py $(DEMO_SET) $(ARGS)

train: install
	$(PY) flows/train_flow.py

test: install
	$(PY) -m pytest -q

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The scheduled path (README "Scheduled deployments"): a local Prefect server (SQLite in
# $PREFECT_HOME, default ~/.prefect), a process worker, and the deployments in prefect.yaml.
# worker and deploy talk to the server in PREFECT_API_URL: this one unless the environment says another.
PREFECT_HOST ?= 127.0.0.1
PREFECT_PORT ?= 4200
PREFECT_API_URL ?= http://$(PREFECT_HOST):$(PREFECT_PORT)/api
WORK_POOL ?= harv-train-pool
PREFECT := PREFECT_API_URL=$(PREFECT_API_URL) $(VENV)/bin/prefect
CHECK_SERVER = @$(PY) -c "import urllib.request as u; u.urlopen('$(PREFECT_API_URL)/health', timeout=10)" 2>/dev/null \
	|| { echo "error: no Prefect server answers at $(PREFECT_API_URL): start one with 'make server' in another terminal, or set PREFECT_API_URL" >&2; exit 1; }

server: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/prefect server start --host $(PREFECT_HOST) --port $(PREFECT_PORT)

worker: install
	$(CHECK_SERVER)
	$(PREFECT) worker start --pool $(WORK_POOL) --type process

deploy: install
	$(CHECK_SERVER)
	@# create the pool if missing; a worker starting at the same moment may create it first
	@$(PREFECT) work-pool inspect $(WORK_POOL) >/dev/null 2>&1 || $(PREFECT) work-pool create $(WORK_POOL) --type process \
	  || $(PREFECT) work-pool inspect $(WORK_POOL) >/dev/null
	$(PREFECT) deploy --all

# An MLflow tracking server (SQLite backend, artifacts served from mlserver/artifacts): what a team
# runs on a shared host with a database and an object store; use with mlflow_tracking_uri=http://127.0.0.1:5001
MLFLOW_SERVER_PORT ?= 5001
mlflow-server: install
	@mkdir -p mlserver
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlserver/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlserver/artifacts --host 127.0.0.1 --port $(MLFLOW_SERVER_PORT)

# The decoded-image cache and torch.compile's kernels (docs/data-at-scale.md): in cache_dir of
# params.yaml, by default ~/.cache/harv-train; 150 KB an image at 224 px. The next run decodes again.
clean-cache:
	@if [ -x $(PY) ]; then $(PY) -m harv_train.core.decoded_cache clear --params params.yaml; \
	else d="$${HARV_TRAIN_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/harv-train}"; \
	  rm -rf "$$d/decoded" "$$d/inductor" && echo "removed $$d/decoded $$d/inductor"; fi

clean: clean-cache
	rm -rf artifacts/demo $(DEMO_DATA) .pytest_cache
