"""`python -m netplan` is the `netplan` command."""

from netplan.cli import main

main()
