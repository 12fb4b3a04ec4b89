"""Atomic output: temporary files next to their targets, renamed into place only on success.

On any failure (an exception, disk full, SIGINT/SIGTERM unwinding as
KeyboardInterrupt) every temporary file is removed and existing outputs stay as
they were.  Signals are held back while a temporary file is created and while
they are cleaned up, so no window leaves one behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
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


class AtomicFiles:
    """Write several files so that either all appear (in order) or none does.

    Usage::

        with AtomicFiles() as files:
            with open(files.temp_for("out.onnx.data"), "wb") as f: ...
            with open(files.temp_for("out.onnx"), "wb") as f: ...
        # renamed into place here, data files first, in the order asked for
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def temp_for(self, final: str) -> str:
        """A new empty temporary file in ``final``'s folder; renamed to ``final`` on success."""
        folder = os.path.dirname(os.path.abspath(final))
        with signals_deferred():
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=folder)
            os.close(fd)
            self.pairs.append((tmp, final))
        return tmp

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                for tmp, _ in self.pairs:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                for tmp, final in self.pairs:
                    os.replace(tmp, final)
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _discard(self) -> None:
        with signals_deferred():
            for tmp, _ in self.pairs:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
