#!/bin/sh
# round 13: loop wake-ups and loop CPU, idle and over one 2 GiB send, main and lbcpu13 alternated
S=/work/wt-lbcpu13/benchmarks/results/issue11-round13/loop_wakes.py
for pass in 1 2; do
  for t in /tmp/base-lb /work/wt-lbcpu13; do
    echo "== $t pass $pass $(date -u +%T) $(cat /proc/loadavg)"
    (cd $t && PYTHONPATH=$t /work/main/.venv/bin/python $S /var/tmp/lw-scratch)
  done
done
echo "== end $(date -u +%T) $(cat /proc/loadavg)"
