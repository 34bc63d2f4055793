# harv-train: `make demo` trains on the bundled demo data, `make test` runs the test suite.
# Both create the virtual environment (.venv) and install the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

DEMO_DATA ?= data/demo
DEMO_SET := --set model_name=efficientnet_lite0 --set data_dir=$(DEMO_DATA) --set classes=null \
            --set artifacts_dir=artifacts/demo --set registered_model_name=harv-train-demo

.PHONY: install demo demo-data train test test-slow clean clean-cache mlflow-ui server worker deploy mlflow-server serve-model secrets

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

# The tests marked slow: crash-resume through a deployment trigger, the Prefect server gone to the end,
# sweep trials on two workers, a sweep's worker killed mid-trial, MLflow down through a sweep, an MLflow
# server restarted mid-run, right MLflow credentials, kill -9 before a rename and inside MLflow logging,
# the overhead benchmark (11 passed in 595 s on 2 cores, 2026-11-30)
test-slow: install
	$(PY) -m pytest -q -m slow

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# Secrets of the shared servers, generated once per clone into $(SECRETS)/ (git-ignored, mode 600,
# never overwritten; delete a file to make a new one): the MLflow admin password and the key that
# signs its forms, Prefect's API auth string (user:password), PostgreSQL's password (docker-compose).
# docker/secrets-env.sh hands them to the servers as NAME_FILE; a variable set in the environment wins.
SECRETS ?= secrets
SECRET_FILES := $(SECRETS)/mlflow_admin_password $(SECRETS)/mlflow_flask_secret_key \
                $(SECRETS)/prefect_auth_string $(SECRETS)/postgres_password
WITH_SECRETS := docker/secrets-env.sh
NEW_SECRET = @mkdir -p $(SECRETS) && chmod 700 $(SECRETS) && umask 077 \
	&& $(PYTHON) -c 'import secrets, sys; print(sys.argv[1] + secrets.token_urlsafe(24))' "$(1)" > $@.tmp \
	&& mv $@.tmp $@ && echo "wrote $@"

secrets: $(SECRET_FILES)

$(SECRETS)/prefect_auth_string:
	$(call NEW_SECRET,admin:)

$(SECRETS)/%:
	$(call NEW_SECRET,)

# The scheduled path (README "Scheduled deployments"): a local Prefect server (SQLite in
# $PREFECT_HOME, default ~/.prefect), a process worker, and the deployments in prefect.yaml.
# worker and deploy talk to the server in PREFECT_API_URL: this one unless the environment says another.
# The server asks every client for its API auth string (PREFECT_SERVER_API_AUTH_STRING, from
# $(SECRETS)/prefect_auth_string); worker, deploy and the flow runs send it as PREFECT_API_AUTH_STRING
# (from the environment, else the same file). Its UI asks for it too. /api/health needs none.
PREFECT_HOST ?= 127.0.0.1
PREFECT_PORT ?= 4200
PREFECT_API_URL ?= http://$(PREFECT_HOST):$(PREFECT_PORT)/api
WORK_POOL ?= harv-train-pool
PREFECT_CLIENT := PREFECT_API_URL=$(PREFECT_API_URL) PREFECT_API_AUTH_STRING_FILE=$(SECRETS)/prefect_auth_string \
	$(WITH_SECRETS)
PREFECT := $(PREFECT_CLIENT) $(VENV)/bin/prefect
CHECK_SERVER = @$(PREFECT_CLIENT) $(PY) docker/check-prefect-server.py $(PREFECT_API_URL)

server: install $(SECRETS)/prefect_auth_string
	PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_API_AUTH_STRING_FILE=$(SECRETS)/prefect_auth_string \
	  $(WITH_SECRETS) $(VENV)/bin/prefect server start --host $(PREFECT_HOST) --port $(PREFECT_PORT)

worker: install
	$(CHECK_SERVER)
	$(PREFECT) worker start --pool $(WORK_POOL) --type process

deploy: install
	$(CHECK_SERVER)
	@# create the pool if missing; a worker starting at the same moment may create it first
	@$(PREFECT) work-pool inspect $(WORK_POOL) >/dev/null 2>&1 || $(PREFECT) work-pool create $(WORK_POOL) --type process \
	  || $(PREFECT) work-pool inspect $(WORK_POOL) >/dev/null
	$(PREFECT) deploy --all

# An MLflow tracking server that asks for credentials (docker/mlflow-server.sh: MLflow's basic-auth
# app; SQLite backend, users in mlserver/basic_auth.db, artifacts served from mlserver/artifacts):
# what a team runs on a shared host with a database and an object store. The admin is `admin` with
# the password in $(SECRETS)/mlflow_admin_password (or MLFLOW_AUTH_ADMIN_PASSWORD), set when the user
# database is created. Train against it with mlflow_tracking_uri=http://127.0.0.1:5001 and
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD set (docs/security.md).
MLFLOW_SERVER_HOST ?= 127.0.0.1
MLFLOW_SERVER_PORT ?= 5001
mlflow-server: install $(SECRETS)/mlflow_admin_password $(SECRETS)/mlflow_flask_secret_key
	@mkdir -p mlserver
	MLFLOW_AUTH_ADMIN_PASSWORD_FILE=$(SECRETS)/mlflow_admin_password \
	MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=$(SECRETS)/mlflow_flask_secret_key \
	MLFLOW_AUTH_DATABASE_URI=sqlite:///$(CURDIR)/mlserver/basic_auth.db PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	  $(WITH_SECRETS) docker/mlflow-server.sh --backend-store-uri sqlite:///$(CURDIR)/mlserver/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlserver/artifacts --host $(MLFLOW_SERVER_HOST) --port $(MLFLOW_SERVER_PORT)

# Serve a registered model's champion over HTTP (docs/serving.md): POST base64 image files to
# http://127.0.0.1:$(SERVE_PORT)/invocations. The model comes from MLFLOW_TRACKING_URI (default: the
# demo's sqlite:///mlflow.db); uvicorn, which MLflow starts by name, is in $(VENV)/bin.
MODEL ?= harv-train-demo
SERVE_PORT ?= 5002
serve-model: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  $(VENV)/bin/mlflow models serve -m models:/$(MODEL)@champion --env-manager local \
	  --host 127.0.0.1 --port $(SERVE_PORT)

# The decoded-image cache and torch.compile's kernels (docs/data-at-scale.md): in cache_dir of
# params.yaml, by default ~/.cache/harv-train; 150 KB an image at 224 px. The next run decodes again.
clean-cache:
	@if [ -x $(PY) ]; then $(PY) -m harv_train.core.decoded_cache clear --params params.yaml; \
	else d="$${HARV_TRAIN_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/harv-train}"; \
	  rm -rf "$$d/decoded" "$$d/inductor" && echo "removed $$d/decoded $$d/inductor"; fi

clean: clean-cache
	rm -rf artifacts/demo $(DEMO_DATA) .pytest_cache
