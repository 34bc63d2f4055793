"""The training flow's link to the Prefect API, which may go away mid-run (a server restart, a
network blip, a dead machine) while training must not.

Training, checkpoints, evaluation, export and MLflow never wait on Prefect. What lives only in
Prefect (artifacts, task-run states, log lines) is best-effort: `record` probes the API (a 3 s
GET of /health) before each Prefect call and skips the call while the API is away. The outage is
said once when it starts and once when it ends; while it lasts, Prefect's own repeated complaints
about it (the events client's reconnect warnings, "Error logging to API", the engine's ConnectError
tracebacks) are held back and no log line is queued for the API. At the end of the run the flow
waits at most `prefect_outage_wait_s` for the API, so that its final state can reach it.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import httpx

logger = logging.getLogger("harv_train.flows.orchestrator")

PROBE_TIMEOUT_S = 3.0  # a live server answers /health in milliseconds; a dead one refuses at once
# Retries of one Prefect call the link makes (2 s, then 4 s): a blip passes, an outage costs 6 s once.
CALL_RETRIES = 2
# Prefect loggers whose records, while the API is away, only repeat that it is away.
_OUTAGE_NOISE = ("prefect.events.clients", "prefect._internal.concurrency")
# Loggers that send run logs to the API (prefect/logging/logging.yml: handler `api`).
_API_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.extra")

_current: contextvars.ContextVar[OrchestratorLink | None] = contextvars.ContextVar("harv_train_link", default=None)

# What a Prefect call raises when the API is away: no connection, or a server error (a restart).
API_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError, httpx.HTTPStatusError, OSError)


def is_outage(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, API_ERRORS)


def _secret(value: Any) -> str | None:
    """A Prefect setting's secret: a SecretStr, or a plain str (how an env variable arrives in some paths)."""
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


class OrchestratorLink:
    """Whether the Prefect API answers, what was skipped while it did not, and how the run ended."""

    def __init__(self, api_url: str | None, auth_header: dict[str, str] | None = None):
        self.api_url = api_url.rstrip("/") if api_url else None
        self._headers = auth_header or {}
        self.down_since: float | None = None  # monotonic
        self.down_at: datetime | None = None  # wall clock, for the message
        self.unreachable_s = 0.0  # outages that ended
        self.outages = 0
        self.skipped = 0
        self.final_state: Any = None  # what the flow returned, kept here in case Prefect never hears it

    @classmethod
    def from_settings(cls) -> OrchestratorLink:
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

        headers = {}
        key, auth = _secret(PREFECT_API_KEY.value()), _secret(PREFECT_API_AUTH_STRING.value())
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif auth:
            headers["Authorization"] = f"Basic {base64.b64encode(auth.encode()).decode()}"
        return cls(PREFECT_API_URL.value(), headers)

    @classmethod
    def current(cls) -> OrchestratorLink:
        """The command line's link (it keeps the outcome if Prefect never hears it), else a new one."""
        return _current.get() or cls.from_settings()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[OrchestratorLink]:
        """Makes this the link `current()` returns (the command line, around its flow call)."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    @property
    def was_unreachable(self) -> bool:
        return self.outages > 0

    def reachable(self) -> bool:
        """Probe the API now; says when it went away or came back."""
        if self.api_url is None:
            return True  # no URL to probe (Prefect's in-process test server): calls say for themselves
        try:
            response = httpx.get(f"{self.api_url}/health", headers=self._headers, timeout=PROBE_TIMEOUT_S)
            ok, reason = response.status_code == 200, f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if ok and self.down:
            self._back()
        elif not ok and not self.down:
            self._gone(reason)
        return ok

    def record(self, what: str, call: Callable[[], Any]) -> Any:
        """Make one Prefect call (an artifact) if the API answers; None if it was skipped."""
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        if not self.reachable():
            self.skipped += 1
            return None
        try:
            with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: CALL_RETRIES}):
                return call()
        except API_ERRORS as exc:
            if not is_outage(exc):
                raise  # a refused call (4xx) is a bug to see, not an outage
            self._gone(f"{type(exc).__name__}: {exc}")
            self.skipped += 1
            logger.debug(f"skipped {what}")
            return None

    def wait_until_back(self, seconds: float) -> bool:
        """At the end of a run that lost the API: wait up to `seconds` for it, so the final state
        reaches it. True when it answers."""
        if not self.down or self.reachable():
            return True
        logger.warning(f"WARNING: waiting up to {seconds:.0f} s (prefect_outage_wait_s) for the Prefect API, "
                       "so that this flow run's final state reaches it")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if self.reachable():
                return True
        return False

    def summary(self) -> str:
        """One clause for the final line and the MLflow tag."""
        if self.down:
            return (f"the Prefect API at {self.api_url} has been unreachable since "
                    f"{self.down_at:%H:%M:%S} UTC")
        return f"the Prefect API at {self.api_url} was unreachable for {self.unreachable_s:.0f} s"

    @contextlib.contextmanager
    def quiet_while_down(self) -> Iterator[None]:
        """Around the flow body and its end: while the API is away, no log line is queued for it and
        Prefect's repeated outage messages are held back (the link said it once)."""
        noise, api = _DropWhileDown(self), _LocalOnlyWhileDown(self)
        noisy = [logging.getLogger(name) for name in (*_OUTAGE_NOISE, "prefect.flow_runs", "prefect.task_runs")]
        api_handlers = {h for name in _API_LOGGERS for h in logging.getLogger(name).handlers
                        if type(h).__name__ == "APILogHandler"}
        for log in noisy:
            log.addFilter(noise)
        for handler in api_handlers:
            handler.addFilter(api)
        try:
            yield
        finally:
            for log in noisy:
                log.removeFilter(noise)
            for handler in api_handlers:
                handler.removeFilter(api)

    def _gone(self, reason: str) -> None:
        if self.down:
            return
        self.down_since, self.down_at = time.monotonic(), datetime.now(timezone.utc)
        self.outages += 1
        # The log worker writes "--- Error logging to API ---" for each batch it cannot send while
        # logging.raiseExceptions is on: lines queued before the outage was seen fail that way.
        logging.raiseExceptions = False
        logger.warning(f"WARNING: the Prefect API at {self.api_url} is unreachable ({reason}); training goes on, "
                       "and this run's Prefect records (artifacts, task states, log lines) are skipped until it is back")

    def _back(self) -> None:
        gone = time.monotonic() - self.down_since
        self.unreachable_s += gone
        self.down_since = self.down_at = None
        logging.raiseExceptions = True
        logger.warning(f"WARNING: the Prefect API at {self.api_url} is reachable again after {gone:.0f} s; "
                       "this run's Prefect records of that time are missing (MLflow has them all)")


class _DropWhileDown(logging.Filter):
    """Prefect's own messages about the outage the link has already reported: its events client's
    reconnect warnings, its services' failures, and the engine's tracebacks of a refused call."""

    def __init__(self, link: OrchestratorLink):
        super().__init__()
        self.link = link

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.link.down:
            return True
        if record.name.startswith(_OUTAGE_NOISE):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not is_outage(exc)


class _LocalOnlyWhileDown(logging.Filter):
    """On Prefect's API log handler: while the API is away a line stays on the console only."""

    def __init__(self, link: OrchestratorLink):
        super().__init__()
        self.link = link

    def filter(self, record: logging.LogRecord) -> bool:
        if self.link.down:
            record.send_to_api = False
        return True
