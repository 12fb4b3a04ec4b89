"""File-system helpers of the writer: temporary files that a signal cannot leak, fsync, file identity.

Every file the writer creates starts under a hidden temporary name in the output
folder and is recorded in a :class:`Temps` *before* it is created, so whatever the
moment a SIGINT/SIGTERM (a ``KeyboardInterrupt``) lands, the cleanup knows it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from bnfold.errors import OutputError

try:
    import fcntl
except ImportError:  # not POSIX: no locks (concurrent runs into one folder are then unguarded)
    fcntl = None  # type: ignore[assignment]


class Temps:
    """The temporary files of one write: recorded before they exist, removed unless kept.

    A name is recorded before the file is created and forgotten only after it is
    renamed or removed, so an exception (or a signal turned into one) at any point
    leaves nothing that :meth:`sweep` does not remove.
    """

    def __init__(self) -> None:
        self._paths: list[str] = []

    def create(self, folder: str, name: str, label: str, mode: int = 0o666) -> str:
        """A new empty file ``folder/.name.XXXXXXXX.tmp`` (``mode`` minus the umask)."""
        for _ in range(100):
            path = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
            self._paths.append(path)  # before it exists: no signal moment can lose it
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
            except FileExistsError:
                self._paths.remove(path)  # someone else's: never ours to remove
                continue
            except OSError as e:
                self._paths.remove(path)
                raise OutputError(f"{label}: cannot write ({e.strerror or e})") from e
            os.close(fd)
            return path
        raise OutputError(f"{label}: cannot create a temporary file in {folder}")

    def adopt(self, path: str) -> None:
        """Record a file another name was renamed to (call before the rename)."""
        self._paths.append(path)

    def keep(self, path: str) -> None:
        """Forget ``path`` (it was renamed to its final name, or handed over)."""
        with contextlib.suppress(ValueError):
            self._paths.remove(path)

    def remove(self, path: str) -> None:
        """Remove one recorded file now."""
        remove_quietly(path)
        self.keep(path)

    def sweep(self) -> None:
        """Remove every recorded file."""
        while self._paths:
            remove_quietly(self._paths[-1])
            self._paths.pop()

    def __contains__(self, path: str) -> bool:
        return path in self._paths


def remove_quietly(path: str) -> None:
    """Unlink ``path`` if it exists."""
    with contextlib.suppress(OSError):
        os.unlink(path)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range, do not wait


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """libc's ``sync_file_range`` (Linux), looked up once; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # only here: a startup cost every other command would pay

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk, without waiting.

    The fsync at the end of a write then finds little left to do: the disk works while
    the rest is written (Linux ``sync_file_range``).  Advisory only: False where it is
    not available or failed; the fsync still makes the data durable.
    """
    fn = _sync_file_range()
    if fn is None:
        return False
    return length <= 0 or fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


def fsync_path(path: str) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename) to disk, where the file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pwrite_all(fd: int, buf: np.ndarray | memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset`` (in pieces of at most 1 GiB)."""
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


#: Buffer of copies the kernel cannot do: big reads and writes, one allocation per copy.
CHUNK = 8 << 20


def copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int, buf: bytearray | None = None) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to the current end of ``dst``."""
    done = 0
    dst.flush()
    if hasattr(os, "copy_file_range"):
        out_off = dst.tell()
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(length - done, 1 << 30), offset + done)
                if n <= 0:
                    break
                done += n
        except OSError:
            pass  # not between these file systems: copy through a buffer
        dst.seek(out_off + done)
    if done == length:
        return
    buf = buf if buf is not None else bytearray(min(CHUNK, length - done))
    view = memoryview(buf)
    src.seek(offset + done)
    while done < length:
        n = src.readinto(view[: min(len(view), length - done)])  # type: ignore[attr-defined]
        if not n:
            raise OutputError(f"{getattr(src, 'name', 'external data')}: external data ended early")
        dst.write(view[:n])
        done += n


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself: no lock file is left).

    bnfold runs writing into the same folder take it to claim data file names and to
    commit, so two of them never pick the same name nor remove each other's files.
    Where the file system has no locks, this is a no-op.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_file(path: str) -> int | None:
    """Open ``path`` and hold a shared lock on it (a data file a run is still writing); its fd."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def is_locked(path: str) -> bool:
    """True when some live process holds a lock taken by :func:`lock_file` on ``path``."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class Target:
    """The file an output path writes: ``path`` (symlinks resolved), and what it was."""

    path: str  # absolute, symlinks resolved: the file that gets replaced or created
    existing: os.stat_result | None  # the regular file it replaces, if any


def resolve_target(output: str) -> Target:
    """Resolve an output path the way ``cp`` and ``sed -i`` do: through symlinks to their target.

    A symlink stays a link: its target is written (a dangling link's target is
    created).  A folder, a device, a FIFO or a socket is refused: bnfold replaces
    files by renaming a new one over them, which would turn ``/dev/null`` into a
    regular file.

    Raises:
        OutputError: the path is a folder or not a regular file, or its folder is missing.
    """
    real = os.path.realpath(output)
    try:
        st: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{output}: cannot write ({e.strerror or e})") from e
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{output}: is a folder")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{output}: not a regular file (a device, FIFO or socket); refusing to replace it")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise OutputError(f"{output}: output folder {folder} does not exist")
    return Target(real, st)


def give_identity(path: str, old: os.stat_result | None) -> None:
    """Give a new file the mode and owner of the file it replaces (owner where allowed).

    With no file replaced, the new file keeps the mode it was created with (0666 minus the umask).
    """
    if old is None:
        return
    mode = stat.S_IMODE(old.st_mode)
    with contextlib.suppress(OSError):
        os.chmod(path, mode)
    st = os.stat(path)
    if (st.st_uid, st.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.chown(path, old.st_uid, old.st_gid)
    except OSError:
        with contextlib.suppress(OSError):
            os.chown(path, -1, old.st_gid)  # a member of the group may keep the group
    if mode & (stat.S_ISUID | stat.S_ISGID):
        with contextlib.suppress(OSError):
            os.chmod(path, mode)  # chown clears set-id bits
