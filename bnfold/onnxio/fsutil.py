"""Signal-safe temporary files for atomic output.

The writer creates temporary files next to their targets and renames them into
place only on success; on any failure (an exception, disk full, SIGINT/SIGTERM
unwinding as KeyboardInterrupt) it removes them.  Between creating a temporary
file and recording it for cleanup a signal must not land, so it is held back there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
