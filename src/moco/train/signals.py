"""Stopping a run cleanly: SIGTERM (a cluster's scheduler) and a first Ctrl-C ask the loop to save a
checkpoint at the next step boundary and stop; a second Ctrl-C interrupts at once."""

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StopSignals:
    """Records the first SIGTERM/SIGINT received while active (`received`), for the loop to act on."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.received: int | None = None

    def _handler(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        self.echo(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
                  "(Ctrl-C again to stop at once)")

    @contextmanager
    def active(self) -> Iterator["StopSignals"]:
        """Handle the signals inside the block (in the main thread only: elsewhere Python cannot)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
