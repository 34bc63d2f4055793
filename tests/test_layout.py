"""The layout keeps its promises: the training core is plain PyTorch, and flows import no other flow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = sorted(f"harv_train.core.{p.stem}" for p in (REPO / "harv_train" / "core").glob("*.py") if p.stem != "__init__")


def test_the_training_core_imports_neither_prefect_nor_mlflow():
    """Everything the core modules import, directly or not, in a fresh interpreter."""
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(CORE) >= 10 and result.stdout.strip() == "[]"


def test_no_flow_imports_another_flows_module_but_the_sweep_its_trials_flow():
    # A sweep's trial is a run of the training flow (a subflow), so sweep_flow imports train_flow, and
    # only that: shared code lives in harv_train/ and tasks/, never in another entry point.
    allowed = {"sweep_flow.py": {"flows.train_flow"}}
    for path in (REPO / "flows").glob("*.py"):
        imported = {node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
        assert {m for m in imported if m and m.startswith("flows")} <= allowed.get(path.name, set()), path.name


def test_every_prefect_task_lives_in_tasks():
    for folder in ("flows", "harv_train"):
        for path in (REPO / folder).rglob("*.py"):
            assert "@task(" not in path.read_text(), f"{path.relative_to(REPO)} defines a Prefect task"
