#!/bin/bash
# SmolLM2 decode on the CPU with and without prepare.align (the norms' weights copied onto
# 64-byte boundaries once, so the TVM norm kernels run): `kiln generate`, batch 1, 64 tokens.
# Artifacts: A=/tmp/align/int4 (default passes), B=/tmp/align/int4-noalign (compiled with
# KILN_DISABLE_PASSES=prepare.align), C=/tmp/align/int8; see the compile lines below.
# Usage: OUT=generate.txt bash bench/results/cpu-2026-12-02-align/run.sh
cd "$(dirname "$0")/../../.."
P="Write a short story about a robot who learns to paint."
out=${OUT:-/tmp/generate.txt}; : > $out
W=/tmp/align
log() { echo "== $1 | load $(cut -d' ' -f1-3 /proc/loadavg) | $(date -u +%H:%M:%S) | $(git describe --always --dirty)" >> $out; }
if [ ! -d $W/int4 ]; then
  .venv/bin/kiln compile smollm2 -t cpu --quant int4_weight_only -o $W/int4 >/dev/null 2>&1
  KILN_DISABLE_PASSES=prepare.align .venv/bin/kiln compile smollm2 -t cpu --quant int4_weight_only -o $W/int4-noalign >/dev/null 2>&1
  .venv/bin/kiln compile smollm2 -t cpu --quant int8_weight_only -o $W/int8 >/dev/null 2>&1
  KILN_DISABLE_PASSES=prepare.align .venv/bin/kiln compile smollm2 -t cpu --quant int8_weight_only -o $W/int8-noalign >/dev/null 2>&1
fi
gen() { .venv/bin/python bench/results/cpu-2026-12-01-tvm/gen_counts.py generate "$@" --prompt "$P" --max-tokens 64 --ignore-eos 2>&1 | grep -E "^\[kiln|TVM counts" >> $out; }
log "eager fp32"; .venv/bin/kiln generate smollm2 --backend eager --quant none --prompt "$P" --max-tokens 64 2>&1 | grep "^\[" >> $out
for r in 1 2 3; do
  for a in int4 int4-noalign int8 int8-noalign; do
    log "kiln $a run $r"; gen $W/$a
  done
done
log "eager fp32 again"; .venv/bin/kiln generate smollm2 --backend eager --quant none --prompt "$P" --max-tokens 64 2>&1 | grep "^\[" >> $out
log "done"
