#!/bin/sh
# One hold: main (6814f0b, detached at /tmp/lbcpu-base) and lbcpu alternated, same scenario.
Y=/work/wt-lbcpu/benchmarks/results/issue11-round11/lb-inc.yaml
OUT=$1
run() { # tree label
  echo "== $2 $(date -u +%T) $(cat /proc/loadavg)"
  (cd $1 && PYTHONPATH=$1 /work/main/.venv/bin/python -m benchmarks run $Y \
     --tools transferd,rclone,disk-direct --repeat 3 --output $OUT/$2 >$OUT/$2.log 2>&1)
}
mkdir -p $OUT
run /tmp/lbcpu-base main-1
run /work/wt-lbcpu lbcpu-1
run /work/wt-lbcpu lbcpu-2
run /tmp/lbcpu-base main-2
echo "== end $(date -u +%T) $(cat /proc/loadavg)"
