#!/bin/sh
# Round 14: one hold of the bench lock: main (detached at /tmp/base-lb) and lbcpu13 (after the
# review fixes and the merge of main) alternated on round 11's lb-inc.yaml (2 GiB
# incompressible over loopback), transferd, rclone and disk-direct side by side.
# Usage: flock /tmp/netplan-bench.lock timeout 880 ab.sh OUT [ORDER...]
# ORDER defaults to: main-1 lbcpu13-1 lbcpu13-2 main-2
Y=/work/wt-lbcpu13/benchmarks/results/issue11-round11/lb-inc.yaml
OUT=$1; shift
[ $# -gt 0 ] || set -- main-1 lbcpu13-1 lbcpu13-2 main-2
run() { # label
  case $1 in main-*) t=/tmp/base-lb ;; *) t=/work/wt-lbcpu13 ;; esac
  echo "== $1 $(date -u +%T) $(cat /proc/loadavg)"
  (cd $t && PYTHONPATH=$t /work/main/.venv/bin/python -m benchmarks run $Y \
     --tools transferd,rclone,disk-direct --repeat 3 --output $OUT/$1 >$OUT/$1.log 2>&1)
}
mkdir -p $OUT
for l in "$@"; do run $l; done
echo "== end $(date -u +%T) $(cat /proc/loadavg)"
