"""transferd: the site daemon that moves datasets and checkpoints between sites.

Public names are re-exported here as the daemon grows; the CLI lives in `transferd.cli`.
"""

__all__: list[str] = []
