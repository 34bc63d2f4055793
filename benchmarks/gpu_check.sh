#!/usr/bin/env bash
# The GPU check (issue 17), one script for one GPU, at most 8 minutes (about 5 expected on an H200):
#   1. installs the carried wheels in .whl/ (benchmarks/gpu_wheels.txt: pydantic and its needs), if any;
#   2. runs the tests marked gpu (tests/test_gpu.py): AMP training, resume equality on CUDA, export parity
#      from a CUDA-trained checkpoint, the augmentation's CPU/GPU pixels, the GPU data path, SyncBatchNorm across two ranks;
#   3. runs benchmarks/bench_gpu.py: mobilenet_v3_small and efficientnet_b0, 1,000 and 10,000 images at
#      224 px, fp16 against bf16, seconds per epoch, images/s, GPU busy;
#   4. writes one JSON summary, $OUT/gpu_check.json ($OUT set) or ./gpu-check/gpu_check.json, and prints it
#      last. Logs beside it: gpu_tests.log, gpu_tests.xml, bench_gpu.log, bench_gpu.json.
# Without a CUDA GPU it says it skipped, writes a JSON saying so, and exits 0 (a few seconds).
#
#   bash benchmarks/gpu_check.sh                 # here or on the GPU machine (from any directory)
#   bash benchmarks/gpu_check.sh --fetch-wheels  # HERE, with network: fill .whl/ for the GPU machine
#
# Exit code: 0 when skipped, or when every gpu test passed and the benchmark ran; 1 otherwise.
set -uo pipefail
HERE=$PWD
cd "$(dirname "$0")/.." || exit 1

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .git/info .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -f .whl/*.whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl -r benchmarks/gpu_wheels.txt || exit 1
    ls -l .whl
    du -sh .whl
    exit 0
fi

START=$(date +%s)
OUTD="${OUT:-$HERE/gpu-check}"
[[ "$OUTD" == /* ]] || OUTD="$HERE/$OUTD"
mkdir -p "$OUTD"
SUMMARY="$OUTD/gpu_check.json"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

write_skip() {  # $1: why
    "$PY" -c 'import json, sys, pathlib; pathlib.Path(sys.argv[2]).write_text(json.dumps(
                 {"gpu_check": "skipped", "skipped": True, "reason": sys.argv[1]}, indent=1) + "\n")' "$1" "$SUMMARY" 2>/dev/null \
        || printf '{"gpu_check": "skipped", "skipped": true, "reason": "%s"}\n' "$1" > "$SUMMARY"
    echo "gpu_check: skipped: $1"
    cat "$SUMMARY"
    exit 0
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    write_skip "no CUDA GPU: torch.cuda.is_available() is False for $PY (or torch does not import)"
fi

echo "gpu_check: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'), $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUTD/nvidia_smi.txt"

INSTALL_S=0
if compgen -G ".whl/*.whl" >/dev/null; then
    t=$(date +%s)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/harv-site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/harv-site${PYTHONPATH:+:$PYTHONPATH}"
    INSTALL_S=$(( $(date +%s) - t ))
    echo "gpu_check: installed the carried wheels in ${INSTALL_S} s:" .whl/*.whl
fi
MISSING=$("$PY" -c '
import importlib.util as u
need = ["pydantic", "annotated_types", "yaml", "PIL", "numpy", "torchvision", "onnx", "onnxruntime", "pytest", "pynvml", "skimage"]
print(" ".join(m for m in need if u.find_spec(m) is None))')
[[ -n "$MISSING" ]] && echo "gpu_check: missing Python modules: $MISSING (carry their wheels: benchmarks/gpu_wheels.txt)"

export HARV_TRAIN_GPU_TESTS=1 HARV_TRAIN_OFFLINE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1 MPLBACKEND=Agg

t=$(date +%s)
timeout 180 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --durations=0 \
    --junitxml="$OUTD/gpu_tests.xml" 2>&1 | tee "$OUTD/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}
TESTS_S=$(( $(date +%s) - t ))

t=$(date +%s)
timeout 270 "$PY" benchmarks/bench_gpu.py --json "$OUTD/bench_gpu.json" --budget-s "${BENCH_BUDGET_S:-180}" 2>&1 \
    | tee "$OUTD/bench_gpu.log"
BENCH_RC=${PIPESTATUS[0]}
BENCH_S=$(( $(date +%s) - t ))

"$PY" - "$OUTD" "$SUMMARY" "$TESTS_RC" "$BENCH_RC" "$INSTALL_S" "$TESTS_S" "$BENCH_S" "$(( $(date +%s) - START ))" "$MISSING" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

outd, summary_path = Path(sys.argv[1]), sys.argv[2]
tests_rc, bench_rc, install_s, tests_s, bench_s, total_s = (int(v) for v in sys.argv[3:9])
summary = {"gpu_check": "ran", "skipped": False, "seconds": {"install": install_s, "tests": tests_s,
           "benchmark": bench_s, "total": total_s}, "missing_modules": sys.argv[9].split()}
tests = {}
try:
    for case in ET.parse(outd / "gpu_tests.xml").iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: " + (node.get("message") or "")[:300]
        tests[case.get("name")] = {"outcome": outcome, "s": round(float(case.get("time", 0)), 2)}
except Exception as exc:
    tests["(no report)"] = {"outcome": f"pytest exit {tests_rc}" + (" (timed out)" if tests_rc == 124 else "")
                            + f": {type(exc).__name__}"}
summary["tests_rc"] = tests_rc
summary["tests"] = tests
bench = {}
try:
    bench = json.loads((outd / "bench_gpu.json").read_text())
except Exception as exc:
    summary["benchmark_error"] = f"no bench_gpu.json ({type(exc).__name__})"
summary["bench_rc"] = bench_rc
summary["environment"] = bench.get("environment")
summary["conclusions"] = bench.get("conclusions")
keys = ("train_s", "images_per_s", "epoch_s", "gpu_busy_pct", "gpu_busy_est_pct", "nvml_util_pct", "max_memory_gib")
rows = {}
for r in bench.get("rows", []):
    name = f"{r['model']} {r['images']} {r['dtype']} b{r['batch_size']} {r['data']}" + (" cudnn.benchmark" if r.get("cudnn_benchmark") else "")
    rows[name] = {k: r[k] for k in keys if r.get(k) is not None} if r.get("status") == "ok" else r.get("status")
summary["rows"] = rows
tests_ok = tests_rc == 0 and tests and all(t["outcome"] == "passed" for t in tests.values())
summary["ok"] = bool(tests_ok and bench_rc == 0 and rows)
Path(summary_path).write_text(json.dumps(summary, indent=1) + "\n")
sys.exit(0 if summary["ok"] else 1)
EOF
RC=$?
echo "gpu_check: tests exit $TESTS_RC, benchmark exit $BENCH_RC, $(( $(date +%s) - START )) s in all; summary $SUMMARY:"
cat "$SUMMARY"
exit $RC
