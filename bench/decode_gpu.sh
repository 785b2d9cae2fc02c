#!/usr/bin/env bash
# Decode benchmark on a GPU, one process per (model, backend), so that one backend's crash
# cannot take the others' numbers with it. Results append to $OUT/decode.jsonl.
set -u
# The device's .git is stale; .ci/gpu-prepare wrote this checkout's describe (bench/provenance.py).
[ -f .carry/code-version ] && export KILN_CODE_VERSION=${KILN_CODE_VERSION:-$(cat .carry/code-version)}
out=${OUT:-bench/results}/decode.jsonl
for model in ${MODELS:-smollm2-shape llama-3.2-1b llama-3-8b}; do
  for backend in ${BACKENDS:-eager kiln reduce-overhead}; do
    timeout ${PER_RUN_TIMEOUT:-240} python3 bench/decode.py --device cuda --dtype bfloat16 \
      --tokens ${TOKENS:-64} --backends "$backend" --model "$model" --out "$out" \
      > "/tmp/decode_${model}_${backend}.log" 2>&1
    rc=$?
    echo "== $model $backend rc=$rc"
    grep -A3 "^backend " "/tmp/decode_${model}_${backend}.log" | tail -2
    [ $rc -ne 0 ] && grep -v "W1122\|warn" "/tmp/decode_${model}_${backend}.log" | tail -4
  done
done
