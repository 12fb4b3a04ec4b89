"""Reading and writing models: clear errors on bad input, atomic writes."""

from __future__ import annotations

import os

import onnx
from google.protobuf.message import DecodeError

from .atomic import AtomicFiles
from .errors import ModelLoadError, OutputError
from .safety import check_external_data, check_tensors


def load_model(path: str, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model (with its external data); raise :class:`ModelLoadError` on bad input."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a folder, not a model file")
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"{path}: empty file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model ({_first_line(e)})") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from e
    if not model.HasField("graph") or not model.ir_version:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or IR version)")
    check_opsets(model, path)
    check_tensors(model, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    check_external_data(model, base_dir, path)  # before reading a byte on the model's behalf
    try:
        onnx.external_data_helper.load_external_data_for_model(model, base_dir)
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ModelLoadError(f"{path}: cannot read external data ({_first_line(e)})") from e
    if check:
        check_model(model, path)
    return model


def check_opsets(model: onnx.ModelProto, label: str) -> None:
    """Refuse opsets newer than the installed onnx knows (its checker would not catch them)."""
    known = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > known:
            raise ModelLoadError(
                f"{label}: opset {o.version} is newer than the installed onnx {onnx.__version__} knows "
                f"(up to {known}); upgrade onnx"
            )


def check_model(model: onnx.ModelProto, label: str, full: bool = False) -> None:
    """Run the onnx checker; raise :class:`ModelLoadError` with its first line."""
    try:
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise ModelLoadError(f"{label}: invalid model: {_first_line(e)}") from e


def save_model(model: onnx.ModelProto, path: str) -> int:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Returns the number of bytes written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: output folder {folder} does not exist")
    data = model.SerializeToString()
    try:
        with AtomicFiles() as files:
            with open(files.temp_for(path), "wb") as f:
                f.write(data)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e
    return len(data)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
