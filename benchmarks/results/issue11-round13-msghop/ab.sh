#!/bin/sh
# usage: ab.sh CC OUTDIR ROUNDS — alternates main (/tmp/base-msg) / msghop (/work/wt-msghop),
# one `transferd` (default policy, nice) run each per round, each tree run from inside it.
# Run it under the bench lock: flock /tmp/netplan-bench.lock sh ab.sh bbr /tmp/msghop/ab-bbr 4
cc=$1; out=$2; rounds=${3:-4}
mkdir -p $out
for r in $(seq 1 $rounds); do
  for tree in main msghop; do
    wt=/tmp/base-msg; [ $tree = msghop ] && wt=/work/wt-msghop
    echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) $tree round $r" >> $out/load.txt
    cd $wt && env NB_KEEP_LOGS=$out/logs-$tree-$r PYTHONPATH=$wt /work/main/.venv/bin/python \
      -m benchmarks run interactive-during-bulk --cc $cc --repeat 1 --tools transferd \
      --output $out/$tree-$r > $out/$tree-$r.out 2>&1
  done
done
echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) end" >> $out/load.txt
