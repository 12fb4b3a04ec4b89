"""The ``.npz`` files of verification: ``--inputs`` read (bounded, untrusted) and ``--save-io`` written and read.

A ``--save-io`` file holds ``trial{k}/input/{name}``, ``trial{k}/reference/{output}``
and ``trial{k}/candidate/{output}`` arrays plus a JSON marker (:data:`SAVE_IO_MARKER`).
Graph names are percent-encoded in the member names (every byte but ``A-Z a-z 0-9 _ -``),
so a name like ``../../x`` cannot make a member that unpacks outside a folder; the
marker says so (``"names": "percent"``) and reading decodes them.

Every ``.npz`` is read as untrusted: it must be a regular file (a FIFO would block
forever), its members' declared sizes are bounded before anything is decompressed,
each member's ``.npy`` header must fit the bytes it holds, and a marker must be a
JSON object with a sane ``trials`` count.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import ml_dtypes
import numpy as np

from bnfold.errors import InputFileError, OutputError
from bnfold.onnxio.fsutil import Temps

if TYPE_CHECKING:
    from bnfold.verify.inputs import InputPlan
    from bnfold.verify.report import VerifyReport

SAVE_IO_MARKER = "__bnfold_io__"
# Bounds of an input file (uncompressed): all members together, the marker, the trials it declares.
MAX_NPZ_BYTES = 8 << 30
MAX_MARKER_BYTES = 1 << 20
MAX_TRIALS = 10_000
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

Feed = dict[str, np.ndarray]


def encode_name(name: str) -> str:
    """Percent-encode a graph name for a member name (``/`` and ``.`` included)."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in name.encode("utf-8"))


def decode_name(text: str) -> str:
    """Inverse of :func:`encode_name`."""
    out, i, raw = bytearray(), 0, text.encode("utf-8")
    while i < len(raw):
        if raw[i] == ord("%") and _hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", errors="replace")


def _hex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789ABCDEFabcdef" for c in b)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InputFileError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputFileError(f"{path}: not a regular file (an input file must be an .npz file)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _npy_header(fp: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        shape, _, dtype = np.lib.format._read_array_header(fp, version)  # type: ignore[attr-defined]
    return tuple(int(d) for d in shape), np.dtype(dtype)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, by member name (without ``.npy``), with sizes bounded first.

    Raises:
        InputFileError: not a regular file, not an ``.npz``, too big, or a member whose
            header does not fit its data (one line saying which).
    """
    with _open_regular(path) as f:
        try:
            z = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise InputFileError(f"{path}: cannot read as .npz ({_first_line(e)})") from None
        with z:
            infos = z.infolist()
            total = sum(i.file_size for i in infos)
            if total > MAX_NPZ_BYTES:
                raise InputFileError(
                    f"{path}: too big: its arrays unpack to {total} bytes (bnfold reads at most {MAX_NPZ_BYTES})"
                )
            arrays: dict[str, np.ndarray] = {}
            for info in infos:
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if name == SAVE_IO_MARKER and info.file_size > MAX_MARKER_BYTES:
                    raise InputFileError(f"{path}: its {SAVE_IO_MARKER} marker is {info.file_size} bytes (too big)")
                try:
                    with z.open(info) as m:
                        shape, dtype = _npy_header(m)
                        if dtype.hasobject:
                            raise InputFileError(f"{path}: array '{name}' holds Python objects (not read)")
                        need = math.prod(shape) * dtype.itemsize
                        if need > info.file_size:
                            raise InputFileError(
                                f"{path}: array '{name}' declares shape {list(shape)} ({need} bytes) but holds "
                                f"{info.file_size} bytes"
                            )
                    with z.open(info) as m:
                        arrays[name] = np.lib.format.read_array(m, allow_pickle=False)
                except InputFileError:
                    raise
                except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as e:
                    raise InputFileError(f"{path}: cannot read array '{name}' ({_first_line(e)})") from None
    return arrays


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_marker(path: str, arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """The ``--save-io`` marker of a file's arrays (None for a plain input file).

    Raises:
        InputFileError: the marker is not a JSON object with an integer ``trials``
            within what the file can hold.
    """
    if SAVE_IO_MARKER not in arrays:
        return None
    try:
        meta = json.loads(str(arrays[SAVE_IO_MARKER]))
    except (ValueError, TypeError):
        raise InputFileError(f"{path}: its {SAVE_IO_MARKER} marker is not JSON") from None
    if not isinstance(meta, dict) or "trials" not in meta:
        raise InputFileError(f"{path}: its {SAVE_IO_MARKER} marker has no 'trials' count")
    trials = meta["trials"]
    if not isinstance(trials, int) or isinstance(trials, bool) or not 0 <= trials <= MAX_TRIALS:
        raise InputFileError(f"{path}: its {SAVE_IO_MARKER} marker declares {trials!r} trials (0..{MAX_TRIALS})")
    if trials > len(arrays):
        raise InputFileError(f"{path}: declares {trials} trials but holds {len(arrays) - 1} array(s)")
    if not isinstance(meta.get("dtypes", {}), dict):
        raise InputFileError(f"{path}: its {SAVE_IO_MARKER} marker has a malformed 'dtypes'")
    return meta


def _split(key: str, meta: dict[str, Any]) -> tuple[int, str, str] | None:
    """``trial{k}/{side}/{name}`` -> ``(k, side, name)`` (None for other members)."""
    head, _, rest = key.partition("/")
    side, _, name = rest.partition("/")
    if not head.startswith("trial") or not head[5:].isdigit() or not name:
        return None
    if meta.get("names") == "percent":
        name = decode_name(name)
    return int(head[5:]), side, name


def _restore(a: np.ndarray, meta: dict[str, Any], key: str) -> np.ndarray:
    return a.astype(ml_dtypes.bfloat16) if meta.get("dtypes", {}).get(key) == "bfloat16" else a


def load_npz(path: str) -> list[Feed]:
    """Arrays of an input file: one feed, or every trial's inputs of a ``--save-io`` file.

    Raises:
        InputFileError: the file cannot be read or its marker is malformed.
    """
    arrays = read_npz(path)
    meta = read_marker(path, arrays)
    if meta is None:
        return [arrays]
    feeds: list[Feed] = [{} for _ in range(meta["trials"])]
    for key, a in arrays.items():
        where = _split(key, meta)
        if where is not None and where[1] == "input" and where[0] < len(feeds):
            feeds[where[0]][where[2]] = _restore(a, meta, key)
    return feeds


def load_io_file(path: str) -> dict[str, Any]:
    """Read a ``--save-io`` file back.

    Returns ``{"meta": {...}, "trials": [{"input": {...}, "reference": {...}, "candidate": {...}}, ...]}``.

    Raises:
        InputFileError: not a ``--save-io`` file, or malformed.
    """
    arrays = read_npz(path)
    meta = read_marker(path, arrays)
    if meta is None:
        raise InputFileError(f"{path}: not a --save-io file (no {SAVE_IO_MARKER} marker)")
    trials: list[dict[str, dict[str, np.ndarray]]] = [
        {"input": {}, "reference": {}, "candidate": {}} for _ in range(meta["trials"])
    ]
    for key, a in arrays.items():
        where = _split(key, meta)
        if where is not None and where[0] < len(trials) and where[1] in trials[where[0]]:
            trials[where[0]][where[1]][where[2]] = _restore(a, meta, key)
    return {"meta": meta, "trials": trials}


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def save_io_file(
    path: str,
    plan: InputPlan,
    output_names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    report: VerifyReport | None = None,
) -> None:
    """Write the inputs of every trial and both models' outputs to one ``.npz`` (atomically).

    Keys: ``trial{k}/input/{name}``, ``trial{k}/reference/{output}``,
    ``trial{k}/candidate/{output}`` with names percent-encoded, and
    :data:`SAVE_IO_MARKER` (JSON: trial count, sources, names, dtypes of bfloat16
    arrays, which are stored as float32).  ``--inputs`` reads such a file back.
    """
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}

    def put(key: str, a: np.ndarray) -> None:
        a = np.asarray(a)
        if a.dtype == ml_dtypes.bfloat16:
            dtypes[key] = "bfloat16"
            a = a.astype(np.float32)
        arrays[key] = a

    for k, feed in enumerate(plan.feeds):
        for name, a in feed.items():
            put(f"trial{k}/input/{encode_name(name)}", a)
    for side, outs in (("reference", reference), ("candidate", candidate)):
        for k, trial in enumerate(outs):
            for name, a in zip(output_names, trial, strict=True):
                put(f"trial{k}/{side}/{encode_name(name)}", a)
    meta = {
        "trials": len(plan.feeds),
        "sources": list(plan.sources),
        "inputs": list(plan.feeds[0]) if plan.feeds else [],
        "outputs": list(output_names),
        "names": "percent",
        "dtypes": dtypes,
        "passed": None if report is None else report.passed,
    }
    arrays[SAVE_IO_MARKER] = np.array(json.dumps(meta))
    # A recorded temp file (0666 less the umask, like the model; a signal cannot leak it), then one rename.
    temps = Temps()
    try:
        tmp = temps.create(os.path.dirname(os.path.abspath(path)), os.path.basename(path), path)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs: keys are array names
        os.replace(tmp, path)
        temps.keep(tmp)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e
    finally:
        temps.sweep()
