#!/bin/bash
# Compile the three artifacts first: for q in none int8_weight_only int4_weight_only; do kiln compile smollm2 -t cpu --quant $q -o /tmp/cpuq/$q; done
# then: OUT=generate.txt bash bench/results/cpu-2026-12-01-tvm/run.sh (one run of every configuration, in order)
cd /work/main
P="Write a short story about a robot who learns to paint."
LONG="$(python3 -c "print(' '.join(['The history of the printing press begins in the fifteenth century, when movable type changed how books were made and read across Europe.']*10) + ' Summarise this text.')")"
out=${OUT:-/tmp/generate.txt}; : > $out
log() { echo "== $1 | load $(cut -d' ' -f1-3 /proc/loadavg) | $(date -u +%H:%M:%S)" >> $out; }
log "eager fp32"; .venv/bin/kiln generate smollm2 --backend eager --quant none --prompt "$P" --max-tokens 64 2>&1 | grep "^\[" >> $out
for q in none int8_weight_only int4_weight_only; do
  for t in 1 0; do
    log "kiln $q KILN_TVM=$t"; KILN_TVM=$t .venv/bin/python bench/results/cpu-2026-12-01-tvm/gen_counts.py generate /tmp/cpuq/$q --prompt "$P" --max-tokens 64 --ignore-eos 2>&1 | grep -E "^\[kiln|TVM counts" >> $out
    log "kiln $q KILN_TVM=$t long prompt"; KILN_TVM=$t .venv/bin/kiln generate /tmp/cpuq/$q --prompt "$LONG" --max-tokens 4 --ignore-eos 2>&1 | grep -E "^\[kiln" >> $out
  done
done
log "eager fp32 again"; .venv/bin/kiln generate smollm2 --backend eager --quant none --prompt "$P" --max-tokens 64 2>&1 | grep "^\[" >> $out
log "done"
