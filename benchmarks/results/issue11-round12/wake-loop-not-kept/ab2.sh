#!/bin/sh
# usage: ab2.sh CC OUTDIR ROUNDS — alternates base (f0d32eb, /tmp/inter/base) / wake (/work/wt-inter)
cc=$1; out=$2; rounds=${3:-3}
mkdir -p $out
for r in $(seq 1 $rounds); do
  for tree in base wake; do
    wt=/tmp/inter/base; [ $tree = wake ] && wt=/work/wt-inter
    echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) $tree round $r" >> $out/load.txt
    cd $wt && env NB_KEEP_LOGS=$out/logs-$tree PYTHONPATH=$wt /work/main/.venv/bin/python -m benchmarks run interactive-during-bulk --cc $cc --repeat 1 --tools transferd,transferd-idle-bulk,transferd-adaptive-bulk --output $out/$tree-$r > $out/$tree-$r.out 2>&1
  done
done
echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) end" >> $out/load.txt
