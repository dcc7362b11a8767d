#!/usr/bin/env bash
# One whole GPU session, by itself, inside a time limit (default 510 s, installs included):
#   1. installs the offline kit (`make gpu-kit`) into a temporary folder: no network, nothing
#      written to the system;
#   2. checks the imports and records every version (versions.json);
#   3. records nvidia-smi's clocks, power and memory (nvidia-smi.txt);
#   4. measures the bf16 GEMM ceiling and the copy bandwidth (ceiling.json);
#   5. runs bench/gpu.py on what is left of the limit, with TORCH_LOGS=recompiles,graph_breaks
#      (records.jsonl, summary.md).
# Everything it prints goes to OUT_DIR/session.log too. On a CPU, --quick runs the same
# steps on tiny models (a test does).
#
#   bash bench/gpu_session.sh OUT_DIR                 # KIT=gpu-kit, DATA=$KIT/data/gpubench
#   bash bench/gpu_session.sh --quick OUT_DIR         # DATA=... a prepared corpus
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=()
if [ "${1:-}" = "--quick" ]; then QUICK=(--quick); shift; fi
OUT=${1:?usage: bash bench/gpu_session.sh [--quick] OUT_DIR}
KIT=${KIT:-gpu-kit}
DATA=${DATA:-$KIT/data/gpubench}
SESSION_S=${SESSION_S:-510}
PY=${PYTHON:-python3}
if [ ${#QUICK[@]} -gt 0 ]; then
  read -r -a BENCH_ARGS <<< "${BENCH_ARGS:---micro-batch 2 --accum 1 --warmup 1 --measure 2}"
else
  read -r -a BENCH_ARGS <<< "${BENCH_ARGS:-}"
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
echo "== gpu_session $(date -u +%FT%TZ): out=$OUT kit=$KIT data=$DATA limit=${SESSION_S}s ${QUICK[*]}"

echo "== 1. the kit"
source bench/gpu_env.sh
[ -d "$DATA/tokenizer" ] && [ -d "$DATA/shards" ] || {
  echo "gpu_session: no prepared corpus at DATA=$DATA (make gpu-kit builds one)"; exit 3; }

echo "== 2. imports and versions"
"$PY" - "$OUT/versions.json" <<'EOF' || { echo "gpu_session: an import failed"; exit 4; }
import importlib, json, platform, sys
need = ["torch", "transformers", "deepspeed", "hydra", "omegaconf", "pydantic",
        "sentencepiece", "safetensors", "numpy", "triton", "ipt"]
optional = ["flash_attn"]
versions, missing = {"python": platform.python_version()}, []
for name in need + optional:
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # a missing optional one is recorded, a missing needed one fails
        versions[name] = f"not importable: {type(e).__name__}: {e}"[:300]
        if name in need and not (name == "triton" and "cpu" in versions.get("torch", "")):
            missing.append(name)
import torch
versions["cuda"] = torch.version.cuda
versions["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
json.dump(versions, open(sys.argv[1], "w"), indent=1)
print(json.dumps(versions, indent=1))
sys.exit(f"missing: {', '.join(missing)}" if missing else 0)
EOF

echo "== 3. nvidia-smi"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi -q -d CLOCK,POWER,MEMORY,PERFORMANCE > "$OUT/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.used,memory.total --format=csv
else
  echo "no nvidia-smi here" | tee "$OUT/nvidia-smi.txt"
fi

echo "== 4. the ceilings"
timeout -k 5 90 "$PY" bench/gpu_ceiling.py --out "$OUT/ceiling.json" "${QUICK[@]}"
GEMM=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['gemm_tflops_median'])" \
  "$OUT/ceiling.json" 2> /dev/null) || GEMM=""

budget=$(( SESSION_S - $(elapsed) - 50 ))  # 50 s: the hard limit's grace and the writing
echo "== 5. bench/gpu.py: ${budget} s of budget after $(elapsed) s"
export TORCH_LOGS=recompiles,graph_breaks OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
timeout -k 5 $(( budget + 40 )) "$PY" bench/gpu.py --data "$DATA" --out "$OUT" \
  --budget-s "$budget" --grace-s 20 ${GEMM:+--gemm-tflops "$GEMM"} "${QUICK[@]}" \
  "${BENCH_ARGS[@]}"
rc=$?
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
echo "== gpu_session: bench/gpu.py exited $rc; the session took $(elapsed) s; files in $OUT:"
ls -la "$OUT"
exit $rc
