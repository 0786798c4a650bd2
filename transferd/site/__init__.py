"""transferd's blocking local I/O at one site, called from worker threads or briefly from the
event loop; nothing here imports asyncio or aiohttp (tests/transferd/test_layers.py).

- `storage`: data_dir behind one `SiteStorage` protocol (local paths, any fsspec URL);
  `objectstore`: object stores without rename (S3, GCS, Azure): commits by a manifest object;
  `failures`: one classifier of every backend's failures (gone, refused, transient; the side)
- `staging`, `source`: incoming files written by offset; outgoing files read by pread (never
  mapped: a file cut short under a mapping is a SIGBUS)
- `receiver`: the receiving end of uploads (staging, verification, atomic commit)
- `journal`: the SQLite state that survives SIGKILL (jobs, uploads, chunk index);
  `state_lock`: one daemon per state_dir
- `keys`, `tls`: key material in keys_dir, TLS contexts
- `checkpoints`: checkpoint run folders (step order, LATEST, retention, readiness)
- `metrics`, `log`, `threads`: the one Prometheus registry, JSON log lines, bulk worker threads
"""
