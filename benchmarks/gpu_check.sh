#!/usr/bin/env bash
# One prepared GPU check of the engine (issue 18): the 7B-shaped engine benchmark on CUDA, bf16,
# batch 32 over 8 adapters of ranks 8-128 (LoRA against backbone-only; target within 10%), TPOT at
# batch 1-32, the decode stall per adapter load by rank, cold TTFT against its floor. Writes
# $OUT/engine-gpu.json (the benchmark's JSON), $OUT/engine-gpu.txt (its tables), $OUT/env.txt.
#
# The backbone is built with random weights on the GPU itself (no checkpoint, no CPU init) and the
# adapters are written as PEFT folders from random tensors: about 3 minutes on an H200 in all.
#
#   OUT=/path/to/results benchmarks/gpu_check.sh
#   WHEELS=/path/to/wheels OUT=... benchmarks/gpu_check.sh     # python3 lacks torch: make a venv
#                                                             # and install from these wheels only
#   DEVICE=cpu SHAPE=tiny DTYPE=float32 BATCHES=8 TPOT_BATCHES=1,4 ROUNDS=1 TOKENS=4 OUT=/tmp/x \
#       benchmarks/gpu_check.sh                                # the same logic on a CPU
#
# Run from the repository root. Needs only: torch, transformers, peft, safetensors, tokenizers,
# rich, pydantic (nats-py optional: without it the worker path encodes tokens but publishes nothing).
set -euo pipefail

OUT=${OUT:?set OUT to the folder the results go to}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-llama-7b}
DTYPE=${DTYPE:-bfloat16}
ROUNDS=${ROUNDS:-3}
TOKENS=${TOKENS:-16}
BATCHES=${BATCHES:-32}
TPOT_BATCHES=${TPOT_BATCHES:-1,2,4,8,32}
LIMIT_S=${LIMIT_S:-420}  # hard stop, so the device is never held past its time
PY=${PYTHON:-python3}
NEEDED="torch transformers peft safetensors tokenizers rich pydantic"

mkdir -p "$OUT"
if ! "$PY" -c "import torch, transformers, peft, safetensors, tokenizers, rich, pydantic" 2>/dev/null; then
    if [ -z "${WHEELS:-}" ]; then
        echo "python ($PY) lacks one of: $NEEDED; set WHEELS to a folder of wheels" >&2
        exit 2
    fi
    VENV=${VENV:-.venv-gpu}
    "$PY" -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" $NEEDED
    PY="$VENV/bin/python"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no gpu')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "DEVICE=cuda but torch sees no GPU" >&2
    exit 3
fi

# The gpu-marked test first (seconds): the side-stream load path against the CPU engine.
if [ "$DEVICE" = cuda ]; then
    "$PY" -m pytest -q -m gpu tests/engine/test_engine_loading.py -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu-test.txt" || true
fi

status=0
timeout "$LIMIT_S" "$PY" benchmarks/engine.py \
    --device "$DEVICE" --shape "$SHAPE" --dtype "$DTYPE" \
    --batches "$BATCHES" --tpot-batches "$TPOT_BATCHES" --rounds "$ROUNDS" --decode-tokens "$TOKENS" \
    --churn-events 1000 --nats-url "" --on-device \
    --workdir "${WORKDIR:-/tmp/lorafaas-gpu-check}" \
    --out "$OUT/engine-gpu.json" 2>&1 | tee "$OUT/engine-gpu.txt" || status=$?

if [ ! -s "$OUT/engine-gpu.json" ]; then
    echo "the benchmark wrote no JSON (exit $status)" >&2
    exit 1
fi
"$PY" - "$OUT/engine-gpu.json" <<'EOF'
import json, sys

r = json.load(open(sys.argv[1]))
keys = ("lora_over_base_throughput", "tpot_batch1_over_base", "load_stall_over_step", "cold_ttft_over_floor",
        "speedup_vs_peft_mixed", "speedup_vs_peft_set_adapter", "max_abs_logit_diff")
print(json.dumps({k: r.get(k) for k in keys} | {"targets_met": r.get("targets_met")}, indent=2))
EOF
