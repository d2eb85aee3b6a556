#!/usr/bin/env bash
# The GPU checks of issue 9 in one run of at most 8 minutes on one H100/H200 with no network:
# install the carried wheels, run the GPU-only tests, measure throughput and MFU against transformers,
# check the memory plan against torch.cuda.max_memory_allocated, write benchmarks/results/<gpu>-<date>.json.
#
#   bash benchmarks/gpu_check.sh --fetch         # here, with network: the wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (device tool: carry [".whl"], timeout 560 s)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # here: every step on CPU with a tiny size (proves the script)
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13), transformers, numpy, pyarrow, pytest, ninja,
# einops, msgpack, psutil, py-cpuinfo, tqdm; not DeepSpeed nor what it needs beyond those (hjson,
# pydantic and its dependencies, a recent typing-extensions). DeepSpeed ships as a source archive: --fetch
# builds a pure-Python wheel of it (its ops compile at first use, with the machine's ninja and nvcc). protscale itself is imported from
# the checkout (PYTHONPATH=platform) and must not import Ray or MLflow on this path (step 1 checks).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --fetch) MODE=fetch ;;
  --cpu-dry-run) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--fetch | --cpu-dry-run]" >&2; exit 2 ;;
esac

DEEPSPEED=deepspeed==0.19.8
WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0)   # pydantic 2.14 needs typing-extensions >= 4.16

if [ "$MODE" = fetch ]; then
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  # No prebuilt ops (DS_BUILD_OPS=0): a py3-none-any wheel that runs on any torch/CUDA.
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$DEEPSPEED" || exit 1
  ls -la .whl
  du -sh .whl
  exit 0
fi

# On the device tool's machine only $OUT comes back: the log and the results file go there too (copy the
# results file into benchmarks/results/ here and commit it).
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi

STAMP=$(date -u +%Y-%m-%d)
WORK=$(mktemp -d)
declare -A RC
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

if [ "$MODE" = gpu ]; then
  PY=python3
  step "0. install the carried wheels"
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'bash benchmarks/gpu_check.sh --fetch' here and carry .whl"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD/platform:/tmp/site"
  THROUGHPUT=(--sizes esm2-650M,85M,esm2-3B --compile-sizes esm2-650M --steps 6 --warmup 3 --profile
              --memory-check 85M --gpu-memory 80)
  TESTS=(tests/test_gpu.py)
  RESULTS=benchmarks/results
else
  PY=${PYTHON:-.venv/bin/python}
  step "0. (dry run) wheels that the GPU run would install"
  ls .whl/*.whl 2>/dev/null || echo "none in .whl/ (run --fetch before the GPU run)"
  export PYTHONPATH="$PWD/platform"
  THROUGHPUT=(--device cpu --sizes tiny-3 --rows 1 --steps 2 --warmup 1 --memory-check 85M --gpu-memory 80)
  TESTS=(tests/test_gpu.py)   # all skipped without CUDA: proves they import without Ray or MLflow
  RESULTS=$WORK/results
fi
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled

step "versions"
"$PY" - <<'EOF' | tee "$WORK/versions.json"
import importlib.metadata as md, json, platform, torch
v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
for pkg in ("deepspeed", "transformers", "triton", "numpy", "pyarrow", "pydantic"):
    try:
        v[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        v[pkg] = None
print(json.dumps(v))
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

step "1. protscale's GPU path imports without Ray or MLflow"
"$PY" -c "import sys; sys.modules['ray'] = None; sys.modules['mlflow'] = None
import protscale.train.engine, protscale.model.transformer, protscale.train.batches, protscale.train.plan, protscale.train.memory
print('ok: engine, transformer, batches, plan, memory')"
RC[imports]=$?

step "2. GPU-only tests"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" 2>&1 | tee "$WORK/tests.log" | grep -v "^DEBUG"
RC[tests]=${PIPESTATUS[0]}

step "3. throughput (MLM, seq 1024) against transformers, and the memory plan"
timeout 330 "$PY" benchmarks/throughput.py "${THROUGHPUT[@]}" --out "$WORK/throughput.json" 2>&1 \
  | grep -v "^\[20..-..-.. ..:..:..,...\] \[INFO\]"
RC[throughput]=${PIPESTATUS[0]}

step "4. results"
mkdir -p "$RESULTS"
RCS="$(for k in "${!RC[@]}"; do echo "$k=${RC[$k]}"; done)" "$PY" - "$WORK" "$RESULTS" "$STAMP" <<'EOF'
import json, os, re, sys
from pathlib import Path

work, results, stamp = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
versions = json.loads((work / "versions.json").read_text())
log = (work / "tests.log").read_text() if (work / "tests.log").exists() else ""
summary = next((l for l in reversed(log.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", l)), "")
throughput = json.loads((work / "throughput.json").read_text()) if (work / "throughput.json").exists() else None
exit_codes = dict(kv.split("=") for kv in os.environ["RCS"].split())
report = {"date": stamp, "versions": versions, "exit_codes": {k: int(v) for k, v in exit_codes.items()},
          "tests": summary.strip("= "), "throughput": throughput}
name = re.sub(r"[^A-Za-z0-9.-]+", "-", versions["gpu"]).strip("-")
out = results / f"{name}-{stamp}.json"
out.write_text(json.dumps(report, indent=2))
print(f"wrote {out}")
if os.environ.get("OUT"):                      # the device tool brings back what is under $OUT
    (Path(os.environ["OUT"]) / out.name).write_text(out.read_text())
if throughput:
    for r in throughput["results"]:
        if "error" not in r:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            print(f"  {r['size']:>10} {r['impl']:<13} compile={r['compile']!s:<5} {r['tokens_per_s']:>12,.0f} tok/s  MFU {mfu}")
    for k, v in throughput["ratios"].items():
        print(f"  ratio protscale/transformers {k}: {v:.2f}x")
print("exit codes:", report["exit_codes"], "| tests:", summary.strip("= "))
EOF
step "done"
for k in "${!RC[@]}"; do [ "${RC[$k]}" = 0 ] || exit 1; done
exit 0
