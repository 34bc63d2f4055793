"""MLflow tracking that never costs a run its training.

The flow owns one `MlflowTracker` per run. Every call goes through `_attempt`: when the tracking
store fails (server down, database locked, disk full), training goes on, the failure is recorded in
`failures`, and later calls are skipped instead of each waiting out its own timeout. Per-epoch
metrics are kept, so that the end of the run (or a resumed run) can log whatever is missing from the
run's history: no step is lost and none is logged twice. Only errors of the store count as an
outage; a bug in this code raises.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote
from typing import Any, Callable, Sequence

from harv_train.core.failpoints import armed, failpoint
from harv_train.core.run_state import LOGGED_EPOCH_METRICS, EpochMetrics
from harv_train.tracking import registry
from harv_train.tracking.registry import Registration, log_summary

logger = logging.getLogger(__name__)


def _store_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or failing tracking store raises: HTTP and database errors, I/O."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.exceptions.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _auth_status(exc: BaseException) -> int | None:
    """401 or 403 when the tracking server refused the credentials (an MlflowException from its REST
    API, or an HTTPError from its artifact proxy); None for any other failure."""
    code = getattr(exc, "error_code", None)
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return 401 if code == "UNAUTHENTICATED" else 403
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if status in (401, 403) else None


def _describe(exc: BaseException, tracking_uri: str) -> str:
    """One line: what failed, and for refused credentials, which variables to set."""
    status = _auth_status(exc)
    if status == 401:
        return (f"MLflow at {tracking_uri} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to a user of that server")
    if status == 403:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        return (f"MLflow at {tracking_uri} denied user {user!r} (HTTP 403): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to a user with EDIT permission on the experiment")
    return _one_line(exc)


def artifacts_beside_store(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store given by path keeps its files: `mlruns/<experiment>`
    in the store's own folder. MLflow's default is `./mlruns` of whatever directory the process runs
    in, which scatters one store's files over every directory a run was started from (and a relative
    artifact root is wrong from anywhere else). None for other stores: a server decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    if not db or db == ":memory:":
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(db).resolve().parent / "mlruns" / folder).as_uri()


def _arm_request_failpoint() -> None:
    """The failure point `mlflow_request` inside every HTTP request MLflow's REST client makes (tracking
    and artifact calls): after the server has answered, before the client reads the answer."""
    from mlflow.utils import rest_utils

    send = rest_utils._get_http_response_with_retries
    if getattr(send, "harv_train_failpoint", False):
        return

    def send_then_failpoint(*args, **kwargs):
        response = send(*args, **kwargs)
        failpoint("mlflow_request")
        return response

    send_then_failpoint.harv_train_failpoint = True
    rest_utils._get_http_response_with_retries = send_then_failpoint


# MLflow 3's UI opens an experiment in its GenAI view unless this tag says it trains models (the
# values are the UI's: mlflow/server/js, ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


class MlflowTracker:
    def __init__(self, tracking_uri: str, experiment: str):
        # An unreachable server should fail fast, not after MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failures: list[str] = []  # what could not be logged, in order
        self.down = False  # after a failure, skip calls until reconnect()
        self._unlogged: dict[str, float] = {}  # summary metrics a failure kept from the run: reconnect() logs them
        self.auth_refused = False  # a failure was the server refusing the credentials (401/403)
        self._client = None
        self._system_metrics = None  # mlflow's SystemMetricsMonitor of the open run

    def _attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.down:
            self.failures.append(f"{what}: skipped while MLflow was unreachable")
            return None
        try:
            failpoint("mlflow_log")
            return fn()
        except _store_errors() as exc:  # the store failed: record it, keep training
            self.down = True
            self.auth_refused = self.auth_refused or _auth_status(exc) is not None
            self.failures.append(f"{what}: {_describe(exc, self.tracking_uri)}")
            logger.warning(f"WARNING: MLflow at {self.tracking_uri} failed while {what} "
                           f"({_describe(exc, self.tracking_uri)}); "
                           "training goes on, checkpoints are written, logging is retried at the end of the run")
            return None

    def client(self):
        if armed("mlflow_request"):
            _arm_request_failpoint()
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def start(self, run_id: str | None, run_name: str | None, tags: dict[str, str]) -> str | None:
        """Open a new run, or reopen `run_id` (a resumed training run continues its MLflow run)."""

        def _start() -> str:
            client = self.client()
            if run_id:
                run = client.get_run(run_id)
                self.experiment_id = run.info.experiment_id
                client.update_run(run_id, status="RUNNING")
                return run_id
            experiment = client.get_experiment_by_name(self.experiment)
            self.experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                self.experiment, artifact_location=artifacts_beside_store(self.tracking_uri, self.experiment))
            if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind set by hand stays
                client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            return client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

        self.run_id = self._attempt("starting the run", _start)
        self._start_system_metrics(resumed=bool(run_id))
        return self.run_id

    def _start_system_metrics(self, resumed: bool) -> None:
        """CPU, memory, disk, network (and GPU with nvidia-ml-py) as `system/*` metrics of the run,
        sampled every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) by MLflow's monitor thread, until
        end(); a resumed run continues their steps. MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns
        them off. The thread stops by itself at its first failed call: it never slows training."""
        if not self.run_id or self.down or self._system_metrics is not None:
            return
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0"):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Its start-up lines ("Started monitoring...", "Skip logging GPU metrics...") are noise here.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.tracking_uri)
            monitor.start()
            self._system_metrics = monitor
        except Exception as exc:  # psutil missing, or the store failed: the run goes on without them
            logger.warning(f"WARNING: no system metrics for this run ({_one_line(exc)})")

    def _stop_system_metrics(self) -> None:
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is not None:
            monitor.finish()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        def _log() -> None:
            existing = self.client().get_run(self.run_id).data.params
            fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
            for i in range(0, len(fresh), 100):
                self.client().log_batch(self.run_id, params=fresh[i : i + 100])

        if self.run_id:
            self._attempt("logging params", _log)

    def logged_steps(self, key: str = "val_acc") -> set[int]:
        history = self.client().get_metric_history(self.run_id, key)
        return {m.step for m in history}

    def log_epochs(self, history: Sequence[EpochMetrics]) -> None:
        """Log every epoch in `history` that the run does not have yet (step = epoch number)."""
        from mlflow.entities import Metric

        def _log() -> None:
            done = self.logged_steps()
            now = int(time.time() * 1000)
            metrics = [
                Metric(key, float(getattr(entry, key)), now, entry.epoch)
                for entry in history
                if entry.epoch not in done
                for key in LOGGED_EPOCH_METRICS
            ]
            if metrics:
                self.client().log_batch(self.run_id, metrics=metrics)

        if self.run_id:
            self._attempt(f"logging epoch {history[-1].epoch if history else 0}", _log)

    def log_metrics(self, metrics: dict[str, float], what: str = "logging summary metrics") -> None:
        if self.run_id:
            self._attempt(what, lambda: log_summary(self.client(), self.run_id, metrics))
            if self.down:  # failed, or skipped during the outage: nothing else would log them again
                self._unlogged.update(metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if self.run_id:
            self._attempt("setting tags", lambda: self.client().log_batch(
                self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_dataset(self, info, context: str = "training") -> None:
        """A DatasetInfo as the run's dataset input (what mlflow.log_input logs): the runs table's
        Dataset column shows its name and digest, its profile the split sizes and class counts."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        def _log() -> None:
            held = self.client().get_run(self.run_id).inputs.dataset_inputs
            if any(d.dataset.name == info.name and d.dataset.digest == info.digest for d in held):
                return  # a resumed run logged it before
            dataset = Dataset(name=info.name, digest=info.digest, source_type="local",
                              source=json.dumps({"uri": info.source}), profile=info.profile_json())
            self.client().log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

        if self.run_id:
            self._attempt("logging the dataset", _log)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id:
            self._attempt(f"uploading {Path(path).name}", lambda: self.client().log_artifact(
                self.run_id, str(path), artifact_path))

    def logged_model(self, tags: dict[str, str]) -> str | None:
        """The models:/ URI of a complete model this run already logged with these tags, if any."""
        from mlflow.entities import LoggedModelStatus

        experiment_id = self.client().get_run(self.run_id).info.experiment_id
        for model in self.client().search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"source_run_id = '{self.run_id}'"
        ):
            if model.status == LoggedModelStatus.READY and all(model.tags.get(k) == v for k, v in tags.items()):
                return model.model_uri
        return None

    def log_model(self, state: dict[str, Any], tags: dict[str, str], onnx: Path | None | bool = True,
                  name: str = "model") -> str | None:
        """Log checkpoint `state` as the image-in, probabilities-out pyfunc model of
        harv_train/tracking/pyfunc_model.py (safetensors weights, model.json, model.onnx, this package's
        code; no pickle); returns its models:/ URI. A model this run already holds with the same `tags`
        (a resumed run, the same best checkpoint) is not logged again."""

        def _log() -> str:
            import mlflow

            from harv_train.tracking.pyfunc_model import log_image_classifier

            logged = self.logged_model(tags)
            if logged:
                return logged
            mlflow.set_tracking_uri(self.tracking_uri)
            with mlflow.start_run(run_id=self.run_id):
                return log_image_classifier(state, name=name, tags=tags, onnx=onnx).model_uri

        return self._attempt("logging the model", _log) if self.run_id else None

    def register_model(self, name: str, model_uri: str, val_acc: float, metric: str = "val_acc") -> Registration | None:
        """Register the run's logged model under `name`, moving `champion` only when it is better
        (harv_train.tracking.registry); returns the Registration, or None when it failed (recorded as a failure)."""
        if not self.run_id:
            return None

        def _register() -> Registration:
            import mlflow

            # MLflow resolves the models:/ source through the process's tracking URI: without this, a
            # resumed run whose model was logged before (log_model() returns early) registered into
            # ./mlflow.db of the working directory, and failed there.
            mlflow.set_tracking_uri(self.tracking_uri)
            return registry.register_and_promote(self.client(), name, model_uri, self.run_id, val_acc, metric=metric)

        return self._attempt(f"registering the model as {name}", _register)

    def end(self, status: str) -> None:
        self._stop_system_metrics()
        if self.run_id:
            self._attempt("closing the run", lambda: self.client().set_terminated(self.run_id, status=status))

    def reconnect(self) -> bool:
        """After a failure, try the store once more, so that what was missed can still be logged."""
        if not self.down:
            return True
        self.down = False
        self._client = None
        if self.run_id:
            self._attempt("reconnecting", lambda: self.client().get_run(self.run_id))
        else:
            self._attempt("reconnecting", lambda: self.client().search_experiments(max_results=1))
        if not self.down:
            logger.info(f"MLflow at {self.tracking_uri} is reachable again: logging what was missed")
            missed, self._unlogged = self._unlogged, {}
            if missed:
                self.log_metrics(missed, "logging the summary metrics missed during the outage")
        return not self.down

    def log_evaluation(self, report, prefix: str = "eval", folder: str = "evaluation") -> None:
        """An EvalReport: `prefix`_* metrics and the report's files under `folder`/ (the val report as
        eval_* in evaluation/, the test report as test_* in test/)."""
        metrics = {f"{prefix}_{k}": v for k, v in {**report.metrics.summary(), **report.calibration}.items()}
        self.log_metrics({**metrics, f"{prefix}_loss": report.loss}, f"logging the {report.split} evaluation metrics")
        for path in report.files.values():
            self.log_artifact(path, folder)

    def log_export(self, result) -> None:
        """An ExportResult: parity and latency metrics and the exported files under export/."""
        self.log_metrics(result.metrics(), "logging the export checks")
        for path in result.files.values():
            self.log_artifact(path, "export")

    def run_url(self) -> str | None:
        """Where the run shows in a browser: the server itself, or `mlflow ui` on its default port."""
        if not (self.run_id and self.experiment_id):
            return None
        base = self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
