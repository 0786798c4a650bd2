#!/bin/sh
# One hold of the bench lock: main (detached at /tmp/base-lb) and lbcpu13 alternated on the
# same scenario (round 11's lb-inc.yaml: 2 GiB incompressible over loopback).
# Usage: flock /tmp/netplan-bench.lock timeout 840 ab.sh OUT
Y=/work/wt-lbcpu13/benchmarks/results/issue11-round11/lb-inc.yaml
OUT=$1
run() { # tree label
  echo "== $2 $(date -u +%T) $(cat /proc/loadavg)"
  (cd $1 && PYTHONPATH=$1 /work/main/.venv/bin/python -m benchmarks run $Y \
     --tools transferd,rclone --repeat 3 --output $OUT/$2 >$OUT/$2.log 2>&1)
}
mkdir -p $OUT
run /tmp/base-lb main-1
run /work/wt-lbcpu13 lbcpu13-1
run /work/wt-lbcpu13 lbcpu13-2
run /tmp/base-lb main-2
echo "== end $(date -u +%T) $(cat /proc/loadavg)"
