"""Stopping a long run cleanly: SIGINT (Ctrl-C) and SIGTERM finish the current step, then the run saves.

:class:`StopRequests` turns the first SIGINT/SIGTERM into a flag that the training loop checks after each
meta-step; a second SIGINT raises ``KeyboardInterrupt`` as usual (for a run that is stuck). Handlers can
only be installed from the main thread: elsewhere the context manager installs nothing and the flag stays
down, so a run in a worker thread behaves as before. ``StopRequests(active=False)`` installs nothing either:
for a run that has nothing to save (no run folder), where deferring a signal would only delay the stop.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopRequests"]

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signal` instead of stopping the process.

    Args:
        message: printed after the signal's name when the first signal arrives.
        active: ``False``: install no handler (SIGINT and SIGTERM keep whatever effect they have, the
            flag stays down).

    Attributes:
        signal: the number of the first signal received, or ``None``.
    """

    def __init__(
        self,
        message: str = "finishing the current step, then saving (press Ctrl-C again to stop at once without saving)",
        active: bool = True,
    ) -> None:
        self.signal: int | None = None
        self.active = active
        self._message = message
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
            print(f"\n{signal.Signals(signum).name} received: {self._message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequests:
        if self.active and threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
