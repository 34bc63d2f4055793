# CPU image of harv-train. Build: `docker build -t harv-train .`; train with data/, artifacts/ and
# params.yaml mounted (README "Docker"). Not built on the project's machines (they have no Docker):
# it follows `make install` (pip install -r requirements.lock), with torch's CPU wheels instead of
# the CUDA ones PyPI serves.
FROM python:3.11-slim AS base

# MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false: the registered model holds no pickle (docs/serving.md), so
# nothing here needs to unpickle one.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
WORKDIR /app

# torch/torchvision first, from the PyTorch CPU index (`2.14.1+cpu` satisfies `==2.14.1`); then the
# rest of the lock without torch, torchvision and the CUDA runtime (triton, nvidia-*, cuda-*), which
# the CPU build does not use. pip sees torch installed and fetches no CUDA wheel.
COPY requirements.lock ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && grep -vE '^(torch|torchvision|triton|nvidia-[A-Za-z0-9_.-]+|cuda-[A-Za-z0-9_.-]+)==' requirements.lock \
      > /tmp/requirements-cpu.txt \
 && pip install -r /tmp/requirements-cpu.txt \
 && rm /tmp/requirements-cpu.txt

# The code; data/, artifacts/ and params.yaml are meant to be mounted over /app at run time.
COPY params.yaml prefect.yaml pyproject.toml ./
COPY flows/ flows/
COPY tasks/ tasks/
COPY harv_train/ harv_train/
# The servers' launchers (docker-compose.yml, docs/security.md): secrets from files, MLflow with auth.
COPY docker/*.sh docker/*.py docker/

# For docker-compose.yml: the Prefect server, worker and MLflow server images, plus the PostgreSQL
# driver MLflow's database backend needs (Prefect's, asyncpg, is in the lock).
FROM base AS services
RUN pip install psycopg2-binary==2.9.13

# The default target: `docker run harv-train [--set KEY=VALUE ...]` is `python flows/train_flow.py`.
FROM base AS train
ENTRYPOINT ["python", "flows/train_flow.py"]
CMD []
