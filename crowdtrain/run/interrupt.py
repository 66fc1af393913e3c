"""Graceful Ctrl-C: the first SIGINT sets a flag that loops check between steps; a second one
raises KeyboardInterrupt as usual. Works on every OS (SIGINT is portable)."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class GracefulInterrupt:
    """Context manager; `bool(flag)` is True once Ctrl-C was pressed."""

    def __init__(self, message: str = "stopping after the current step (Ctrl-C again to abort)"):
        self.message = message
        self.requested = False
        self._previous = None

    def __bool__(self) -> bool:
        return self.requested

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message:
            import sys

            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
