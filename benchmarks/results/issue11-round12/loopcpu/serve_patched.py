"""`transferd serve ...` with `transferd.daemon` constants set from PATCH=NAME=VALUE,...
(e.g. PATCH=LAG_TICK_S=0.05): a measurement aid for idle_loop.py, not a product option."""

import os
import sys

import transferd.daemon
from transferd.cli import main

for pair in filter(None, os.environ.get("PATCH", "").split(",")):
    name, value = pair.split("=")
    if not hasattr(transferd.daemon, name):
        sys.exit(f"PATCH: transferd.daemon has no {name}")
    setattr(transferd.daemon, name, float(value))
sys.argv = ["transferd", *sys.argv[1:]]
main()
