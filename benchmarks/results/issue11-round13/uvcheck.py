"""Review fix 1, checked on real loops: a 100 ms callback, a channel thread posting to a
LoopInbox 58 ms into it; the lag samples of 20 ms or more the probe reports (one expected).
Usage: PYTHONPATH=<tree> python uvcheck.py uvloop asyncio"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import uvloop

from transferd.net.channels import LoopInbox
from transferd.net.loop_lag import watch_lag


async def main() -> None:
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, float | None]] = []

    def on_tick(lag: float | None) -> bool:
        samples.append((loop.time(), lag))
        return False

    probe = asyncio.create_task(watch_lag(on_tick, working=lambda: True))
    await asyncio.sleep(0.1)
    inbox = LoopInbox(loop)

    def channel_thread() -> None:
        time.sleep(0.058)
        inbox.post(lambda: None)

    def stall() -> None:  # the loop held 100 ms; the post comes 58 ms into it
        thread = threading.Thread(target=channel_thread)
        thread.start()
        time.sleep(0.1)
        thread.join()

    loop.call_soon(stall)
    await asyncio.sleep(0.1)
    probe.cancel()
    try:
        await probe
    except asyncio.CancelledError:
        pass
    late = [round(lag, 3) for _, lag in samples if lag is not None and lag >= 0.02]
    print(type(loop).__module__, "samples >= 20 ms:", late)


if __name__ == "__main__":
    for kind in sys.argv[1:]:
        if kind == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())
