"""The Optuna side of a sweep: the study in its RDB storage, what a training run reports per epoch,
and what the sweep reads back (trial states, the best trial, plots, a table). No Prefect, no MLflow.

The storage is the one place a sweep's state lives: trials in it are finished (COMPLETE, PRUNED,
FAIL) or RUNNING; a sweep killed mid-trial leaves that trial RUNNING, and `--resume` runs it again
from its checkpoint under the same number, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from harv_train.errors import ConfigError
from harv_train.sweep.trial import SweepTrial

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
PRUNED_EPOCH_ATTR = "pruned_at_epoch"  # set by the training run that the pruner stopped
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # the sweep's MLflow parent run, reopened by --resume
SWEEP_ID_ATTR = "sweep_id"  # tags the sweep's MLflow runs, so runs opened before the parent can be found
UNLOGGED_ATTR = "mlflow_unlogged."  # + trial number: trained, but its MLflow logging failed (one key each:
#                                      trials on several threads set theirs at once)
# Pruning starts once this many trials finished and each trial's first epoch is reported:
# MedianPruner stops a trial whose val_acc is below the median of earlier trials at the same epoch.
PRUNER_STARTUP_TRIALS = 2

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is the flow's job


def default_storage(sweep_dir: str | Path) -> str:
    """SQLite next to the sweep: `SWEEP_DIR/optuna.db`."""
    return f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def shown_storage(url: str) -> str:
    """The storage URL as logs and MLflow show it: a password in it becomes ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: optuna will say so; nothing to hide
        return url


def _storage(url: str) -> optuna.storages.RDBStorage:
    # SQLite: wait for a lock held by another trial's process instead of failing at once.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def open_study(storage: str, name: str, seed: int, resume: bool) -> optuna.Study:
    """The sweep's study: new (refused when one with trials is there, unless resuming), or the
    existing one (refused when resuming and there is none). TPE seeded with `seed`."""
    store = _storage(storage)
    exists = any(s.study_name == name for s in store.get_all_studies())
    if resume and not exists:
        raise ConfigError(f"--resume: no study {name!r} in {shown_storage(storage)}: run without --resume to start "
                          "the sweep")
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)
    study = optuna.create_study(storage=store, study_name=name, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if exists and not resume and study.get_trials(deepcopy=False):
        raise ConfigError(f"a sweep with {len(study.trials)} trial(s) is already in {shown_storage(storage)}: "
                          "pass --resume to continue it, or choose another artifacts_dir")
    return study


def sweep_id(study: optuna.Study) -> str:
    """The sweep's own id, made once and kept in the study (a study name like "sweep" is not unique)."""
    if SWEEP_ID_ATTR not in study.user_attrs:
        import uuid

        study.set_user_attr(SWEEP_ID_ATTR, uuid.uuid4().hex)
    return study.user_attrs[SWEEP_ID_ATTR]


def add_unlogged(study: optuna.Study, number: int) -> None:
    study.set_user_attr(f"{UNLOGGED_ATTR}{number}", True)


def remove_unlogged(study: optuna.Study, number: int) -> None:
    study.set_user_attr(f"{UNLOGGED_ATTR}{number}", False)


def unlogged(study: optuna.Study) -> list[int]:
    """Trials whose training finished but whose MLflow logging failed: the sweep logs them once MLflow answers."""
    return sorted(int(k[len(UNLOGGED_ATTR):]) for k, v in study.user_attrs.items() if k.startswith(UNLOGGED_ATTR) and v)


def report_epoch(ref: SweepTrial, epoch: int, val_acc: float, may_prune: bool = True) -> bool:
    """Report one epoch's val_acc to the trial (once per epoch); True when the pruner says stop.
    Called by the training flow after each epoch, in whatever process trains the trial. With
    `may_prune` False it only reports: the last epoch (stopping after it saves nothing; the trial
    is COMPLETE), and epochs a killed run finished but never reported (its resume catches up)."""
    study = optuna.load_study(study_name=ref.study_name, storage=_storage(ref.storage),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                                                 n_warmup_steps=0))
    trial = optuna.trial.Trial(study, _trial_id(study, ref.trial_number))
    if epoch not in trial.storage.get_trial(trial._trial_id).intermediate_values:  # a resumed epoch: once
        trial.report(float(val_acc), epoch)
    if may_prune and trial.should_prune():
        trial.set_user_attr(PRUNED_EPOCH_ATTR, epoch)
        return True
    return False


def _trial_id(study: optuna.Study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def unfinished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials a killed sweep left RUNNING: --resume trains them again from their checkpoints."""
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def trial_handle(study: optuna.Study, number: int) -> optuna.trial.Trial:
    """A live handle on a RUNNING trial (one asked by an earlier, killed process)."""
    return optuna.trial.Trial(study, _trial_id(study, number))


def finish_trial(study: optuna.Study, number: int, succeeded: bool) -> TrialState:
    """Tell the study how trial `number` ended, from what its training run reported: PRUNED when the
    pruner stopped it, COMPLETE with its best val_acc, FAIL when it failed or reported nothing."""
    trial = study._storage.get_trial(_trial_id(study, number))
    if trial.state in FINISHED:
        return trial.state  # told before (a resumed sweep)
    values = trial.intermediate_values
    if succeeded and PRUNED_EPOCH_ATTR in trial.user_attrs:
        study.tell(number, state=TrialState.PRUNED)
    elif succeeded and values:
        study.tell(number, max(values.values()))
    else:
        study.tell(number, state=TrialState.FAIL)
    return study._storage.get_trial(_trial_id(study, number)).state


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str
    best_val_acc: float | None
    epochs: int
    params: dict[str, Any]


def trials_table(study: optuna.Study) -> list[TrialRow]:
    return [TrialRow(t.number, t.state.name,
                     max(t.intermediate_values.values()) if t.intermediate_values else None,
                     len(t.intermediate_values), dict(t.params))
            for t in study.get_trials(deepcopy=False)]


def table_markdown(rows: list[TrialRow]) -> str:
    names = sorted({k for r in rows for k in r.params})
    lines = ["| trial | state | best val_acc | epochs | " + " | ".join(names) + " |",
             "|" + "---|" * (4 + len(names))]
    for r in rows:
        acc = "" if r.best_val_acc is None else f"{r.best_val_acc:.4f}"
        values = [f"{r.params[n]:.4g}" if isinstance(r.params.get(n), float) else str(r.params.get(n, ""))
                  for n in names]
        lines.append(f"| {r.number} | {r.state} | {acc} | {r.epochs} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[TrialRow]) -> str:
    import csv
    import io

    names = sorted({k for r in rows for k in r.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "state", "best_val_acc", "epochs", *names])
    for r in rows:
        writer.writerow([r.number, r.state, "" if r.best_val_acc is None else r.best_val_acc, r.epochs,
                         *(r.params.get(n, "") for n in names)])
    return out.getvalue()


def write_plots(study: optuna.Study, folder: Path) -> dict[str, Path]:
    """Optimization history, param importances and slices as PNG files in `folder`. A plot Optuna
    cannot draw yet (importances need 2 completed trials that differ) is left out, with a log line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances),
                       ("slice", ovm.plot_slice)):
        try:
            with warnings.catch_warnings():
                # Optuna's matplotlib plots are all "experimental", and its importance evaluator warns
                # when the trials score alike: a warning each per sweep, nothing the user can act on.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message="Target and region quantiles select the same set")
                axes = draw(study)
        except Exception as exc:  # too few completed trials for this plot
            logger.info(f"No {name} plot: {type(exc).__name__}: {exc}")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written[name] = path
    return written
