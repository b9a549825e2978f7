#!/usr/bin/env bash
# The one GPU script: the correctness smoke, then the throughput table, on one device (~8 min on an H100/H200,
# most of it torch.compile's first compilations). Needs PyTorch and the project's dependencies only.
#
#   bash bench/gpu_suite.sh [OUT_DIR] [--cpu]
#
# OUT_DIR (default gpu_suite_out) receives smoke.json, smoke.md, throughput.jsonl and throughput.md. --cpu runs
# both on the CPU instead (the tiny model; what a machine without a GPU can check). Exit status: the smoke's
# (1 when a correctness check failed); the table is written either way.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_suite_out
CPU=()
for arg in "$@"; do
    case "$arg" in
        --cpu) CPU=(--cpu) ;;
        *) OUT="$arg" ;;
    esac
done
mkdir -p "$OUT"
WORK="${DIST_CLM_SUITE_WORK:-/tmp/dist_clm_gpu_suite}"
PY="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # (the project's own environment, where made)

echo "== correctness smoke (bf16 ZeRO-2 / ZeRO-3: train, resume, compile, export) =="
"$PY" bench/gpu_smoke.py "${CPU[@]}" --work "$WORK" --json "$OUT/smoke.json" --markdown | tee "$OUT/smoke.md"
smoke=${PIPESTATUS[0]}

echo "== throughput (plain vs dist_clm, eager vs compiled, loss head, document masking) =="
"$PY" bench/gpu_throughput.py "${CPU[@]}" --quick --markdown --work "$WORK" --json "$OUT/throughput.jsonl" \
    | tee "$OUT/throughput.md"
exit "$smoke"
