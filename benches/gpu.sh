#!/usr/bin/env bash
# Speed on a machine with a GPU, from a portalora binary built beforehand (the GPU machine needs
# no Rust), side by side with PyTorch + PEFT on the same GPU:
#
#   benches/gpu.sh [PORTALORA] [OUT_DIR]        # defaults: target/release/portalora, /tmp/portalora-gpu
#
# 1. `portalora info`, `bench matmul` (GFLOP/s per shape) and `bench coop` (the matmul's
#    cooperative-matrix path, where offered: checked, and timed against the subgroup kernel);
# 2. models with SmolLM2-135M's and Gemma-3-270M's shapes and random f32 weights
#    (benches/random_model.py: speed does not depend on the values, and nothing is downloaded);
# 3. `bench step` for each model and method (LoRA with the per-kernel breakdown): tokens/s, CPU
#    seconds to encode and submit a step, GPU busy and idle time, dispatches and passes; and LoRA
#    with PORTALORA_COOP=on and =off side by side (the forward products on cooperative matrices);
# 4. benches/compare.py for each model and method: portalora's tokens/s against PyTorch + PEFT f32
#    and bf16 autocast, same batch, sequence, rank and targets;
# and last, one JSON summary (OUT_DIR/summary.json, also printed). Needs python3 with torch,
# transformers and peft. Each command has a time limit, so that a slow or failing part leaves the
# rest to run; the whole fits in 8 minutes on an H200. MODELS, METHODS, BATCH, SEQ, STEPS and
# TORCH (f32,bf16) narrow or change it.
set -u
BIN=${1:-target/release/portalora}
OUT=${2:-/tmp/portalora-gpu}
PY=${PYTHON:-python3}
MODELS=${MODELS:-"smollm2-135m gemma3-270m"}
METHODS=${METHODS:-"lora lora-fa vera delta-lora lora-plus"}
BATCH=${BATCH:-4}
SEQ=${SEQ:-128}
STEPS=${STEPS:-8}
TORCH=${TORCH:-f32,bf16}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
# SUMMARY_ONLY=1 writes the summary of what an earlier (perhaps interrupted) run left in OUT_DIR.
[ "${SUMMARY_ONLY:-0}" = 1 ] && MODELS_RUN="" || MODELS_RUN=$MODELS
say() { echo "== $(date +%T) $*" >&2; }
# Runs a command with a time limit, its output to a file (and the file's tail to stderr).
run() {
  local limit=$1 file=$2
  shift 2
  timeout "$limit" "$@" >"$OUT/$file" 2>"$OUT/$file.err"
  local rc=$?
  [ $rc -eq 0 ] || say "exit $rc: $* (see $file.err)"
  tail -n 3 "$OUT/$file.err" >&2
  return 0
}

if [ -n "$MODELS_RUN" ]; then
say "adapter"
run 60 info.json "$BIN" info --json
cat "$OUT/info.json" >&2
say "matmul"
run 90 matmul.jsonl "$BIN" bench matmul --json --repeats 3 --seconds 0.2
say "cooperative matrices"
run 60 coop.json "$BIN" bench coop --size 2048
cat "$OUT/coop.json" >&2
fi
for m in $MODELS_RUN; do
  say "model $m"
  [ -f "$OUT/$m/model.safetensors" ] || run 120 "model-$m.txt" "$PY" "$HERE/random_model.py" "$m" "$OUT/$m"
  # The cooperative-matrix path forced on and off, side by side (auto decides by its own timing).
  for coop in on off; do
    say "bench step $m lora, PORTALORA_COOP=$coop"
    PORTALORA_COOP=$coop run 120 "step-$m-lora-coop-$coop.txt" "$BIN" bench step --model "$OUT/$m" --method lora \
      --batch "$BATCH" --seq "$SEQ" --steps 4 --warmup 1 --json
  done
  for method in $METHODS; do
    say "bench step $m $method"
    kernels=--no-kernels
    [ "$method" = lora ] && kernels=
    run 120 "step-$m-$method.txt" "$BIN" bench step --model "$OUT/$m" --method "$method" --batch "$BATCH" \
      --seq "$SEQ" --steps 4 --warmup 1 $kernels --json
  done
  for method in $METHODS; do
    say "compare $m $method"
    run 150 "compare-$m-$method.txt" "$PY" "$HERE/compare.py" --model "$OUT/$m" --method "$method" \
      --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --portalora "$BIN" --torch "$TORCH"
  done
done

say "summary"
"$PY" - "$OUT" "$MODELS" "$METHODS" <<'EOF' | tee "$OUT/summary.json"
import json, os, sys
out, models, methods = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()

def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name)) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None

def lines(name):
    try:
        return [json.loads(l) for l in open(os.path.join(out, name)) if l.startswith("{")]
    except OSError:
        return []

summary = {"info": last_json("info.json"), "matmul": lines("matmul.jsonl"), "coop": last_json("coop.json"),
           "runs": []}
for m in models:
    for method in methods:
        s, c = last_json(f"step-{m}-{method}.txt") or {}, last_json(f"compare-{m}-{method}.txt") or {}
        summary["runs"].append({
            "model": m, "method": method,
            "tokens_per_s": s.get("tokens_per_s"), "step_seconds": s.get("step_seconds"),
            "warmup_steps": s.get("warmup_steps"),
            "encode_seconds": s.get("encode_seconds"), "gpu_step_seconds": s.get("gpu_step_seconds"),
            "gpu_idle_seconds": s.get("gpu_idle_seconds"), "dispatches": s.get("dispatches"),
            "passes": s.get("passes"), "gpu_bytes": s.get("gpu_bytes"),
            "kernels": (s.get("kernels") or [])[:12],
            "train_tokens_per_s": c.get("portalora_tokens_per_s"),
            "peft_f32_tokens_per_s": c.get("peft_tokens_per_s"), "ratio_f32": c.get("ratio"),
            "peft_bf16_tokens_per_s": c.get("peft_bf16_tokens_per_s"), "ratio_bf16": c.get("ratio_bf16"),
            "device": c.get("device"),
        })
    for coop in ("on", "off"):
        b = last_json(f"step-{m}-lora-coop-{coop}.txt") or {}
        summary["runs"].append({"model": m, "method": f"lora, PORTALORA_COOP={coop}",
                                "tokens_per_s": b.get("tokens_per_s"), "step_seconds": b.get("step_seconds"),
                                "encode_seconds": b.get("encode_seconds"),
                                "gpu_step_seconds": b.get("gpu_step_seconds"), "dispatches": b.get("dispatches"),
                                "kernels": (b.get("kernels") or [])[:12]})
print(json.dumps(summary))
EOF
