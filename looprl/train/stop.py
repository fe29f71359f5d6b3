"""Stop a run between steps on Ctrl-C or SIGTERM, so its last checkpoint is a clean one."""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """While active, the first SIGINT/SIGTERM sets `requested` instead of raising.

    The training loop checks `requested` between steps, saves and exits. Mid-step the
    weights may be half-updated, so that is not a state to checkpoint. A second signal
    raises `KeyboardInterrupt` at once. Outside the main thread (where Python does not
    allow signal handlers) it does nothing.
    """

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
