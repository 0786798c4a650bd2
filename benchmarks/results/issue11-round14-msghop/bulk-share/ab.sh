#!/bin/sh
# alternates the committed-results commit (3e770d1) and main (918c959) on interactive-during-bulk
cc=$1; out=$2; rounds=${3:-2}
mkdir -p $out
for r in $(seq 1 $rounds); do
  for tree in old now; do
    wt=/tmp/base-$tree
    echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) $tree round $r" >> $out/load.txt
    cd $wt && env PYTHONPATH=$wt /work/main/.venv/bin/python \
      -m benchmarks run interactive-during-bulk --cc $cc --repeat 1 --tools transferd \
      --output $out/$tree-$r > $out/$tree-$r.out 2>&1
  done
done
echo "$(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg) end" >> $out/load.txt
