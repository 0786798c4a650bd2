#!/bin/sh
# usage: trace.sh OUTDIR — one run per tree and CC with the daemons' debug lines, for
# `python -m benchmarks.message_trace` (per-stage times). Under the bench lock.
out=$1
mkdir -p $out
for cc in bbr cubic; do
  for tree in main msghop; do
    wt=/tmp/base-msg; [ $tree = msghop ] && wt=/work/wt-msghop
    echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) $tree $cc" >> $out/load.txt
    cd $wt && env NB_KEEP_LOGS=$out/logs-$tree-$cc TRANSFERD_LOG_LEVEL=debug PYTHONPATH=$wt \
      /work/main/.venv/bin/python -m benchmarks run interactive-during-bulk --cc $cc --repeat 1 \
      --tools transferd --output $out/$tree-$cc > $out/$tree-$cc.out 2>&1
  done
done
echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) end" >> $out/load.txt
