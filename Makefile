# harv-train: `make demo` trains on the bundled demo data, `make test` runs the test suite.
# Both create the virtual environment (.venv) and install the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

DEMO_DATA ?= data/demo
DEMO_SET := --set model_name=efficientnet_lite0 --set data_dir=$(DEMO_DATA) --set classes=null \
            --set artifacts_dir=artifacts/demo

.PHONY: install demo demo-data train test clean mlflow-ui

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@

demo-data: install
	$(PY) -m tasks.demo_data $(DEMO_DATA)

demo: demo-data
	$(PY) flows/train_flow.py $(DEMO_SET)

train: install
	$(PY) flows/train_flow.py

test: install
	$(PY) -m pytest -q

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf artifacts/demo $(DEMO_DATA) .pytest_cache
