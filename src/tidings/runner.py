"""Running a dispatcher on its own until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from tidings.service import Service
from tidings.settings import Settings


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed (it is on Linux and macOS), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def run_dispatcher(settings: Settings) -> None:
    """Start a dispatcher process's service and stop it cleanly on a signal."""
    service = Service(settings, run_dispatcher=True)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()
