"""The sweep flow: `python flows/sweep_flow.py --trials N [--params FILE] [--set KEY=VALUE ...]
[--space FILE] [--resume] [--workers pool:NAME --parallel K]`.

An Optuna study (TPE, seeded with the params' seed; median pruner) over a search space
(harv_train/sweep/space.py). Each trial is a run of the training flow with the trial's params and
its own artifacts_dir (ARTIFACTS_DIR/trials/trial-NNN): a subflow of this flow run, or with
`--workers pool:NAME` a run of the deployment `train/sweep-trial-NAME` on that work pool, so that
as many workers as run train trials at once. Each training run reports val_acc per epoch to the
study (the pruner may stop it: state Pruned) and is a child of the sweep's one MLflow parent run,
which gets the space, the best params as params.yaml, plots and the trials table. The winner is
registered under registered_model_name with the champion rule. The study lives in an RDB
(ARTIFACTS_DIR/optuna.db unless --storage): --resume continues a killed sweep. docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if __package__ in (None, ""):  # run as a script: make the project packages importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
TRIAL_DEPLOYMENT = "sweep-trial"  # + "-POOL": the training flow's deployment the trials run as
DEFAULT_HEARTBEAT_TIMEOUT_S = 300.0  # a dead worker's trial is noticed within this (docs/sweeps.md)
DEFAULT_TRIAL_RETRIES = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python flows/sweep_flow.py",
        description="Hyper-parameter sweep: Optuna trials as training flow runs, one MLflow parent run.",
    )
    parser.add_argument("--trials", type=int, required=True, help="trials to finish (pruned ones count)")
    parser.add_argument("--params", default="params.yaml", help="params YAML file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fix one param for every trial; VALUE is YAML (repeatable)")
    parser.add_argument("--space", default=None, help="search space YAML (default: the built-in space, docs/sweeps.md)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in artifacts_dir")
    parser.add_argument("--workers", default=None, metavar="pool:NAME",
                        help="run each trial as a deployment run on work pool NAME (default: in this process)")
    parser.add_argument("--parallel", type=int, default=1, help="trials at once (with --workers: the workers)")
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="SECONDS",
                        help="with --workers: a trial run silent this long (its worker died) is run again from its "
                             f"checkpoint; no worker online this long stops the sweep (default {DEFAULT_HEARTBEAT_TIMEOUT_S:g})")
    parser.add_argument("--trial-retries", type=int, default=DEFAULT_TRIAL_RETRIES,
                        help=f"times a crashed trial run is run again from its checkpoint (default {DEFAULT_TRIAL_RETRIES})")
    parser.add_argument("--storage", default=None,
                        help="Optuna RDB URL (default: sqlite:///ARTIFACTS_DIR/optuna.db; postgresql://... for a team)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace):
    """Everything that can be checked before a flow run: params, space, counts, --workers."""
    from harv_train.config import load_config, parse_override
    from harv_train.sweep.space import load_space

    cfg = load_config(args.params, dict(map(parse_override, args.overrides)))
    load_space(args.space, cfg)
    check_counts(args.trials, args.parallel, args.trial_retries)
    check_timeout(args.heartbeat_timeout)
    pool_name(args.workers)
    return cfg


def check_counts(trials: int, parallel: int, trial_retries: int = 0) -> None:
    from harv_train.errors import ConfigError

    if trials < 1:
        raise ConfigError(f"--trials must be 1 or more, got {trials}")
    if parallel < 1:
        raise ConfigError(f"--parallel must be 1 or more, got {parallel}")
    if trial_retries < 0:
        raise ConfigError(f"--trial-retries must be 0 or more, got {trial_retries}")


def check_timeout(seconds: float) -> None:
    from harv_train.sweep.watch import check_timeout as check

    check(seconds)


def pool_name(workers: str | None) -> str | None:
    """`pool:NAME` -> NAME; None runs the trials in this process."""
    from harv_train.errors import ConfigError

    if workers is None:
        return None
    kind, _, name = workers.partition(":")
    if kind != "pool" or not name.strip():
        raise ConfigError(f"--workers must be pool:NAME (a Prefect work pool), got {workers!r}")
    return name.strip()


if __name__ == "__main__":  # first: bad arguments answer at once; the server boots during the imports
    from harv_train.cli.startup import FastCommand

    _command = FastCommand(lambda: check_args(parse_args()))

from optuna.trial import TrialState
from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed

from flows.train_flow import train_flow
from harv_train.cli.commands import run_flow_command
from harv_train.cli.startup import EarlyServer, flow_server
from harv_train.config import ParamOverrides, TrainConfig, load_config, write_params_file
from harv_train.core.checkpoints import FINAL, LAST
from harv_train.core.locking import artifacts_lock
from harv_train.errors import ConfigError, UserError
from harv_train.sweep import study as studies
from harv_train.sweep import tracking as sweep_tracking
from harv_train.sweep import watch
from harv_train.sweep.space import SearchSpace, load_space, trial_config
from harv_train.sweep.trial import SweepTrial
from harv_train.tracking.mlflow_tracker import MlflowTracker

SPACE_ATTR = "space"  # the study's space, so --resume refuses another one


@flow(name="sweep", log_prints=True)
def sweep_flow(params_file: str | None = "params.yaml", overrides: ParamOverrides | None = None, trials: int = 16,
               space_file: str | None = None, resume: bool = False, workers: str | None = None,
               parallel: int = 1, storage: str | None = None, study_name: str = "sweep",
               heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S, trial_retries: int = DEFAULT_TRIAL_RETRIES):
    """Hyper-parameter sweep of the training flow: `trials` Optuna trials over the space in
    `space_file` (none: the built-in space), the rest of the params from `params_file` and
    `overrides`. `workers` pool:NAME runs each trial on that work pool, `parallel` at once; a trial
    run silent for `heartbeat_timeout` s (its worker died) is set Crashed, and a crashed trial run is
    run again from its checkpoint up to `trial_retries` times."""
    try:
        cfg = load_config(params_file, overrides)
        space = load_space(space_file, cfg)
        check_counts(trials, parallel, trial_retries)
        check_timeout(heartbeat_timeout)
        pool = pool_name(workers)
        with artifacts_lock(cfg.artifacts_dir):
            runner_options = {"pool": pool, "heartbeat_timeout": heartbeat_timeout, "retries": trial_retries}
            return _sweep(cfg, space, trials, resume, parallel,
                          storage or studies.default_storage(cfg.artifacts_dir), study_name, runner_options)
    except UserError as exc:
        print(f"[sweep] error: {exc}")
        return Failed(message=str(exc))


class _Parent:
    """The sweep's MLflow parent run: opened at the start, or as soon as MLflow answers again (it may
    be down when the sweep starts or goes down during it: trials go on meanwhile, as training does)."""

    def __init__(self, cfg: TrainConfig, study, space: SearchSpace, n_trials: int, storage: str, sweep_dir: Path):
        self.tracker = MlflowTracker(cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
        self.study, self.sweep_dir = study, sweep_dir
        self.params = {**cfg.flat_dict(), "sweep.trials": n_trials, "sweep.storage": studies.shown_storage(storage),
                       "sweep.space": space.to_dict()}
        self.name = f"sweep-{runtime.flow_run.name}"
        self.tags = {"prefect.flow_run_id": str(runtime.flow_run.id), "sweep.study": study.study_name,
                     sweep_tracking.SWEEP_ID_TAG: studies.sweep_id(study)}
        self._lock = threading.Lock()  # trials on several threads ask for it at once

    def open(self) -> str | None:
        """The parent run's id, opening (or reopening) it when MLflow answers; None while it does not."""
        with self._lock:
            tracker = self.tracker
            if tracker.down and not tracker.reconnect():
                return None
            if tracker.run_id is None:
                if tracker.start(self.study.user_attrs.get(studies.PARENT_RUN_ATTR), self.name, self.tags):
                    self.study.set_user_attr(studies.PARENT_RUN_ATTR, tracker.run_id)
                    tracker.log_params(self.params)
                    tracker.log_artifact(self.sweep_dir / "space.yaml")
            return None if tracker.down else tracker.run_id


COMPLETED, UNLOGGED, FAILED = "completed", "unlogged", "failed"  # how a trial's training ended


class _Trials:
    """Runs one trial's training: a subflow here, or a deployment run on the pool."""

    def __init__(self, cfg: TrainConfig, storage: str, study, parent: _Parent, pool: str | None,
                 heartbeat_timeout: float, retries: int):
        self.cfg, self.storage, self.study_name = cfg, storage, study.study_name
        self.parent, self.sweep_id = parent, studies.sweep_id(study)
        self.pool, self.heartbeat_timeout, self.retries = pool, heartbeat_timeout, retries
        self.deployment = _trial_deployment(pool) if pool else None
        self.sweep_flow_run_id = str(runtime.flow_run.id)

    def trial_dir(self, number: int) -> Path:
        return Path(self.cfg.artifacts_dir) / "trials" / f"trial-{number:03d}"

    def tags(self, number: int) -> dict[str, str]:
        return sweep_tracking.child_tags(self.parent.open(), self.study_name, number, self.sweep_id)

    def run(self, number: int, params: dict) -> str:
        """Train trial `number`: COMPLETED when its flow run completed (or was pruned), UNLOGGED when
        its training finished but its MLflow logging failed (MLflow down to its end: catch_up logs it
        later), else FAILED. A run that crashed (its process, or its worker with it, killed) is run
        again from its checkpoint, `retries` times at most; the Optuna trial stays RUNNING meanwhile
        and is told once, by the caller."""
        trial_dir = self.trial_dir(number)
        cfg = trial_config(self.cfg, params, trial_dir)
        ref = SweepTrial(storage=self.storage, study_name=self.study_name, trial_number=number)
        tags = self.tags(number)
        for attempt in range(self.retries + 1):
            resume = (trial_dir / "checkpoints" / LAST).is_file()  # cut short before: continue it
            state = self._run(number, cfg, ref, tags, resume, attempt)
            if not state.is_crashed():
                break
            if attempt < self.retries:
                print(f"[sweep] trial {number} crashed ({state.message}); running it again from its checkpoint "
                      f"(retry {attempt + 1} of {self.retries})")
            else:
                print(f"[sweep] trial {number} crashed ({state.message}) after {self.retries} retries: it fails")
        if state.is_completed():
            return COMPLETED
        if state.is_failed() and (trial_dir / "checkpoints" / FINAL).is_file():
            print(f"[sweep] trial {number}: trained, but not logged to MLflow ({state.message}); its val_acc "
                  "counts, and the sweep logs it once MLflow answers")
            return UNLOGGED
        return FAILED

    def catch_up(self, trial) -> bool:
        """Log a finished trial whose MLflow logging failed: its training flow resumed with nothing left
        to train (a pruned trial: `epochs` where it stopped) and nothing to report to the study, which
        already has its end; its MLflow run (opened then, if never before) gets everything. True when
        that run completed."""
        number, pruned_at = trial.number, trial.user_attrs.get(studies.PRUNED_EPOCH_ATTR)
        cfg = trial_config(self.cfg, trial.params, self.trial_dir(number))
        tags = self.tags(number)
        if pruned_at is not None:
            cfg = cfg.model_copy(update={"epochs": pruned_at})
            tags |= {"sweep.pruned": "true", "sweep.pruned_at_epoch": str(pruned_at)}
        print(f"[sweep] trial {number}: logging it to MLflow (its training is done)")
        return self._run(number, cfg, None, tags, True, "log").is_completed()

    def _run(self, number: int, cfg: TrainConfig, ref: SweepTrial | None, tags: dict[str, str], resume: bool,
             attempt: int | str):
        name = f"trial-{number:03d}"
        if self.deployment is None:
            return train_flow.with_options(flow_run_name=name)(
                params_file=None, overrides=ParamOverrides.model_validate(cfg.to_dict()), resume=resume,
                sweep_trial=ref, run_tags=tags, return_state=True)
        from prefect import get_client
        from prefect.deployments import run_deployment

        # The idempotency key: a request the Prefect client retries (its answer lost to a timeout under
        # load) must not create a second flow run of the trial, which a free worker would then train again.
        run = run_deployment(self.deployment, flow_run_name=name, timeout=0,
                             idempotency_key=f"sweep-{self.sweep_flow_run_id}-trial-{number}-attempt-{attempt}",
                             job_variables=watch.job_variables(self.heartbeat_timeout), parameters={
            "params_file": None, "overrides": cfg.to_dict(), "resume": resume,
            "sweep_trial": ref and ref.model_dump(), "run_tags": tags})
        with get_client(sync_client=True) as client:  # its final state, or Crashed once it fell silent
            return watch.wait_for_run(client, run.id, self.pool, self.heartbeat_timeout, f"trial {number}")


def _trial_deployment(pool: str) -> str:
    """The training flow as deployment `train/sweep-trial-POOL` on the pool (created or updated):
    its runs start in this repository, as prefect.yaml's deployments do."""
    from prefect import get_client
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except Exception:
            raise ConfigError(f"--workers: no work pool {pool!r} on the Prefect server: create it with "
                              f"`prefect work-pool create {pool} --type process` and start workers on it") from None
    name = f"{TRIAL_DEPLOYMENT}-{pool}"
    deployment = RunnerDeployment.from_flow(train_flow, name=name, work_pool_name=pool,
                                            description="Trials of flows/sweep_flow.py on this work pool")
    deployment.entrypoint = "flows/train_flow.py:train_flow"
    # A set_working_directory pull step, as prefect.yaml's: a plain path would make the worker copy
    # the whole repository (.venv and artifacts included) into a temporary folder for every trial run.
    deployment.storage = LocalStorage(path=str(REPO))
    deployment.apply()
    return f"train/{name}"


def _sweep(cfg: TrainConfig, space: SearchSpace, n_trials: int, resume: bool, parallel: int, storage: str,
           study_name: str, runner_options: dict):
    sweep_dir = Path(cfg.artifacts_dir)
    study = studies.open_study(storage, study_name, cfg.seed, resume)
    if resume and study.user_attrs.get(SPACE_ATTR, space.to_dict()) != space.to_dict():
        raise ConfigError(f"--resume: the space differs from the sweep's in {studies.shown_storage(storage)}: "
                          "resume with the same --space, or start a new sweep in another artifacts_dir")
    study.set_user_attr(SPACE_ATTR, space.to_dict())
    (sweep_dir / "space.yaml").write_text(space.to_yaml(), encoding="utf-8")

    parent = _Parent(cfg, study, space, n_trials, storage, sweep_dir)
    parent_id = parent.open()
    print(f"[sweep] study {study_name!r} in {studies.shown_storage(storage)}; MLflow parent run "
          + (parent_id or f"not opened yet (MLflow at {cfg.mlflow_tracking_uri} does not answer; trials go on)"))
    runner = _Trials(cfg, storage, study, parent, **runner_options)

    for trial in studies.unfinished(study):  # cut short by a killed sweep: the same trial again
        print(f"[sweep] trial {trial.number} was cut short: resuming it")
        _finish(study, trial.number, runner.run(trial.number, dict(trial.params)))

    asking = threading.Lock()

    def next_trial():
        with asking:  # one ask at a time, counted against what is finished or running
            running = len(studies.unfinished(study))
            if studies.finished_count(study) + running >= n_trials:
                return None
            trial = study.ask()
            return trial.number, space.suggest(trial)

    def trial_loop():
        while (asked := next_trial()) is not None:
            number, params = asked
            print(f"[sweep] trial {number}: {params}")
            _finish(study, number, runner.run(number, params))

    if parallel == 1:
        trial_loop()
    else:  # each thread carries this flow run's context, so its trials are this run's subflows
        with ThreadPoolExecutor(parallel) as pool_threads:
            futures = [pool_threads.submit(contextvars.copy_context().run, trial_loop) for _ in range(parallel)]
            for future in futures:
                future.result()
    return _conclude(cfg, study, parent, runner, sweep_dir)


def _finish(study, number: int, outcome: str) -> None:
    if outcome == UNLOGGED:
        studies.add_unlogged(study, number)
    state = studies.finish_trial(study, number, outcome != FAILED)
    trial = study.trials[number]
    value = f", val_acc {trial.value:.4f}" if trial.value is not None else ""  # pruned: its last epoch's
    print(f"[sweep] trial {number}: {state.name}{value}")


def _conclude(cfg: TrainConfig, study, parent: _Parent, runner: _Trials, sweep_dir: Path):
    """The sweep's results: trials table, plots and best params.yaml on disk and on the MLflow parent
    run (with the trials MLflow missed logged first), the winner registered, a Prefect table."""
    tracker = parent.tracker
    rows = studies.trials_table(study)
    (sweep_dir / "trials.csv").write_text(studies.table_csv(rows), encoding="utf-8")
    markdown = studies.table_markdown(rows)
    plots = studies.write_plots(study, sweep_dir / "plots")
    counts = {state: sum(r.state == state for r in rows) for state in ("COMPLETE", "PRUNED", "FAIL")}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))  # a pruned trial has a value too
    if not complete:
        tracker.end("FAILED")
        return Failed(message=f"no trial completed ({counts}): see the trials' flow runs")
    best = study.best_trial
    best_params = sweep_dir / "best" / "params.yaml"
    best_params.parent.mkdir(exist_ok=True)
    best_cfg = trial_config(cfg, best.params, sweep_dir / "best")
    best_cfg = best_cfg.model_copy(update={"registered_model_name": cfg.registered_model_name})
    write_params_file(best_cfg, best_params)
    print(f"[sweep] best trial {best.number}: val_acc {best.value:.4f} with {best.params} -> {best_params}")
    _catch_up(study, parent, runner)

    tracker.log_metrics({"best_val_acc": best.value, "best_trial": best.number,
                         **{f"trials_{k.lower()}": v for k, v in counts.items()}})
    tracker.set_tags({f"best.{k}": v for k, v in best.params.items()})
    tracker.log_artifact(best_params, "best")
    tracker.log_artifact(sweep_dir / "trials.csv")
    for path in plots.values():
        tracker.log_artifact(path, "plots")
    winner = _trial_run(tracker, best.number)
    if winner is not None:
        _log_test_metrics(tracker, best.number, winner)
    if winner is not None and cfg.registered_model_name:
        _register(cfg, tracker, best.number, best.value, winner)
    create_markdown_artifact(key="sweep-trials", markdown=f"# Sweep trials\n\n{markdown}\n\n"
                             f"Best: trial {best.number}, val_acc {best.value:.4f}\n",
                             description="The sweep's trials, their state and params")
    unlogged = studies.unlogged(study)
    if tracker.down or not tracker.run_id or unlogged:
        # As for training: visible, not silent; --resume logs what is missing once MLflow is back.
        tracker.end("FAILED")
        missed = f" (trials {', '.join(map(str, unlogged))} and the parent run)" if unlogged else ""
        return Failed(message=(
            f"the sweep finished (best trial {best.number}, val_acc {best.value:.4f}, params in {best_params}), "
            f"but MLflow logging failed{missed}: rerun with --resume once {cfg.mlflow_tracking_uri} is "
            "reachable to log it and register the winner"))
    tracker.end("FINISHED")
    return Completed(message=f"best trial {best.number}: val_acc {best.value:.4f}; {counts}")


def _catch_up(study, parent: _Parent, runner: _Trials) -> None:
    """Once MLflow answers: the parent run open, trials whose logging failed logged, and trial runs
    opened before the parent was (they lacked its id) nested under it."""
    parent_id = parent.open()
    if parent_id is None:
        return
    tracker = parent.tracker
    for trial in studies.unlogged(study):
        if runner.catch_up(study.trials[trial]):
            studies.remove_unlogged(study, trial)
    tracker._attempt("nesting the trial runs under the parent", lambda: sweep_tracking.adopt_children(
        tracker.client(), tracker.experiment_id, parent_id, studies.sweep_id(study)))


def _trial_run(tracker: MlflowTracker, number: int):
    """Trial `number`'s MLflow child run, or None (no parent run, MLflow down, or none found)."""
    if not tracker.run_id or tracker.down:
        return None
    return tracker._attempt(f"finding trial {number}'s run", lambda: sweep_tracking.trial_run(
        tracker.client(), tracker.experiment_id, tracker.run_id, number))


def _log_test_metrics(tracker: MlflowTracker, number: int, child) -> None:
    """The best trial's test_* metrics (its data has a test split) on the parent, under the same names:
    the sweep's honest number, measured once on images no trial chose by."""
    test = sweep_tracking.test_metrics(child)
    if test:
        tracker.log_metrics(test, f"logging trial {number}'s test metrics")
        print(f"[sweep] best trial {number} on the test split: "
              + ", ".join(f"{k} {v:.4f}" for k, v in sorted(test.items()) if k in ("test_accuracy", "test_loss")))


def _register(cfg: TrainConfig, tracker: MlflowTracker, number: int, val_acc: float, child) -> None:
    client = tracker.client()
    uri = sweep_tracking.logged_model_uri(client, tracker.experiment_id, child.info.run_id)
    if not uri:
        print(f"[sweep] WARNING: trial {number} logged no model in MLflow: nothing registered")
        return
    registration = tracker._attempt(f"registering the model as {cfg.registered_model_name}", lambda: (
        sweep_tracking.register_winner(client, cfg.mlflow_tracking_uri, cfg.registered_model_name, uri,
                                       child.info.run_id, val_acc)))
    if registration:
        print(f"[sweep] {registration.summary()}")


def main(argv: list[str] | None = None, early_server: EarlyServer | None = None) -> int:
    args = parse_args(argv)

    def start():
        cfg = check_args(args)
        with flow_server(early_server, "[sweep]"):
            return sweep_flow(params_file=None, overrides=ParamOverrides.model_validate(cfg.to_dict()),
                              trials=args.trials, space_file=args.space, resume=args.resume,
                              workers=args.workers, parallel=args.parallel, storage=args.storage,
                              heartbeat_timeout=args.heartbeat_timeout, trial_retries=args.trial_retries,
                              return_state=True)

    return run_flow_command(start)[0]


if __name__ == "__main__":
    _command.run(lambda early_server: main(early_server=early_server))
