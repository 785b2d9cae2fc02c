#!/usr/bin/env bash
# Serving under tensor parallelism on a GPU machine with 2+ GPUs: for each TP size in $TP
# (default "1 2"), `kiln serve MODEL --tensor-parallel-size N` on a random-weight shape
# (bench/make_shape_model.py; tensor parallelism compiles the model at start-up, an
# artifact holds one device's graph), then `kiln bench serve` at 1 stream and at each of
# $CONCURRENCY (default 64) streams (128 in / 128 out ±50%, 3 requests a stream).
# Reports land in $OUT/serve_tp<N>_<model>_c<C>.json; logs in /tmp/serve_tp<N>.log.
#   MODEL=llama-3-8b TP="1 2" bash bench/serve_tp_gpu.sh
set -u
[ -f .carry/code-version ] && export KILN_CODE_VERSION=${KILN_CODE_VERSION:-$(cat .carry/code-version)}
out=${OUT:-bench/results}
work=${WORK:-/tmp/kiln-serve-bench}
model=${MODEL:-llama-3-8b}
mkdir -p "$out" "$work"
spec=$work/$model
[ -f "$spec/config.json" ] || python3 bench/make_shape_model.py "$model" -o "$spec" --dtype bfloat16 || exit 1
port=${PORT:-18531}
for tp in ${TP:-1 2}; do
  t0=$SECONDS
  kiln serve "$spec" -t cuda --dtype bfloat16 --tensor-parallel-size $tp --port $port \
    --max-num-seqs 256 --kv-cache-gib ${KV_GIB:-16} --max-num-batched-tokens ${BATCHED_TOKENS:-2048} \
    --log-level warning > "/tmp/serve_tp$tp.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 $server 2> /dev/null || break
    sleep 0.5
  done
  if ! curl -sf "http://127.0.0.1:$port/health" > /dev/null; then
    echo "== TP=$tp: server did not come up"; tail -30 "/tmp/serve_tp$tp.log"; kill $server 2> /dev/null
    port=$((port + 1)); continue
  fi
  echo "== TP=$tp $model ready in $((SECONDS - t0)) s"
  kiln bench serve --url "http://127.0.0.1:$port" --concurrency 1 --num-requests 3 --warmup \
    --input-len 32 --output-len 128 --range-ratio 0 --json "$out/serve_tp${tp}_${model}_c1.json" | tail -8
  for c in ${CONCURRENCY:-64}; do
    kiln bench serve --url "http://127.0.0.1:$port" --concurrency $c --num-requests $((3 * c)) --warmup \
      --input-len 128 --output-len 128 --json "$out/serve_tp${tp}_${model}_c$c.json" | tail -8
  done
  kill $server; wait $server 2> /dev/null
  grep -i "error\|traceback" "/tmp/serve_tp$tp.log" | head -5
  port=$((port + 1))
done
