"""Inputs for verification: generated from each graph input's dtype and shape, or read from ``.npz`` files.

Generated values (seeded, one independent draw per trial):

- floating point (float16, bfloat16, float32, float64): standard normal, ``N(0, 1)``,
  rounded to the input's dtype; uniform over ``[LO, HI]`` with ``--val-range NAME:LO,HI``
  (or ``--val-range LO,HI`` for every float input), as polygraphy does;
- integers: uniform over ``LO..HI`` inclusive (:data:`DEFAULT_INT_RANGE`, set with
  ``--input-range LO,HI``), clipped to what the dtype can hold;
- bool: ``True`` or ``False`` with probability 1/2.

Shapes: ``--input-shape NAME:1,3,224,224`` sets an input's shape.  Otherwise fixed
dimensions are used as declared, a symbolic or unknown *first* dimension (the batch
in nearly every model) becomes 1, and a symbol already fixed elsewhere (by
``--input-shape``, an input file, or the batch rule) takes that value.  Any other
unknown dimension raises :class:`~bnfold.errors.InputShapeError` naming the input
and the option: bnfold does not guess image sizes or sequence lengths.

Real data: an ``.npz`` file whose array names are input names is one trial; inputs
it leaves out are generated.  A file written by ``--save-io`` is read back as all
the trials it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from bnfold.errors import InputFileError, InputShapeError, NotVerifiableError
from bnfold.verify.iofile import SAVE_IO_MARKER, load_npz  # noqa: F401 - SAVE_IO_MARKER re-exported

DEFAULT_INT_RANGE: tuple[int, int] = (0, 9)
DEFAULT_TRIALS = 3
# Generated inputs of one trial may take at most this many bytes (a declared 1x3x100000x100000
# float32 input would be 112 GiB): beyond it verification stops with exit 6, saying which input.
MAX_GENERATED_BYTES = 2 << 30

Dim = int | str | None
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input that must be fed: name, element type and declared dimensions.

    ``dims`` is None when the model declares no shape; a dimension is an int when
    fixed, a string for a symbol (``dim_param``) and None when unknown.
    """

    name: str
    elem_type: int
    dims: tuple[Dim, ...] | None

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype of the input (bfloat16 from ml_dtypes)."""
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    def describe(self) -> str:
        """``x: float32[N,3,?,640]``."""
        if self.dims is None:
            return f"{self.name}: {self.dtype.name} (no shape)"
        return f"{self.name}: {self.dtype.name}[{','.join('?' if d is None else str(d) for d in self.dims)}]"


@dataclass
class InputOptions:
    """How verification inputs are made (all fields picklable).

    ``trials`` counts the *generated* trials; None means :data:`DEFAULT_TRIALS`
    without input files and 0 with them (the files are then used instead of
    generated inputs; give ``trials`` to use both).
    """

    seed: int = 0
    trials: int | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    int_range: tuple[int, int] = DEFAULT_INT_RANGE
    files: list[str] = field(default_factory=list)
    # Float inputs drawn uniformly from [LO, HI] instead of N(0, 1): by input name, "" for every input.
    val_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def val_range(self, name: str) -> tuple[float, float] | None:
        """``--val-range`` of one input (its own, else the one for every input), or None."""
        return self.val_ranges.get(name, self.val_ranges.get(""))


@dataclass
class InputPlan:
    """The feeds of every trial, where each came from, and the shapes chosen."""

    specs: list[InputSpec]
    feeds: list[Feed]
    sources: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready description (shapes and dtypes, not the values)."""
        return {
            "trials": [
                {"source": src, "inputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in f.items()}}
                for src, f in zip(self.sources, self.feeds, strict=True)
            ],
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------
# Reading the model's inputs
# ---------------------------------------------------------------------------


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are left at their values)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tp = vi.type
        if not tp.HasField("tensor_type"):
            kind = tp.WhichOneof("value") or "untyped"
            raise NotVerifiableError(
                f"input '{vi.name}' is a {kind.replace('_type', '')}, not a tensor: bnfold cannot make it"
            )
        tt = tp.tensor_type
        if tt.elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or tt.elem_type not in _SUPPORTED:
            name = onnx.TensorProto.DataType.Name(tt.elem_type)
            raise NotVerifiableError(f"input '{vi.name}' has element type {name}: bnfold cannot generate it")
        dims: tuple[Dim, ...] | None = None
        if tt.HasField("shape"):
            dims = tuple(_dim(d) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, tt.elem_type, dims))
    return specs


_SUPPORTED = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BOOL,
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None  # unknown (also the -1 some old exporters write)


# ---------------------------------------------------------------------------
# Parsing command-line values
# ---------------------------------------------------------------------------


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"NAME:1,3,224,224"`` -> ``("NAME", (1, 3, 224, 224))``; ValueError with a reason.

    The name is everything before the last colon, so names with colons work.
    An empty dimension list (``"NAME:"``) is a scalar.
    """
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"'{text}' is not NAME:D0,D1,... (for example input:1,3,224,224)")
    dims = dims.strip()
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError:
        raise ValueError(f"'{text}': dimensions must be integers, as in {name}:1,3,224,224") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"'{text}': dimensions must not be negative")
    return name, shape


def parse_val_range(text: str) -> tuple[str, tuple[float, float]]:
    """``"NAME:LO,HI"`` -> ``("NAME", (LO, HI))``, ``"LO,HI"`` -> ``("", (LO, HI))`` for every
    float input; finite, LO <= HI; ValueError with a reason.  The name is everything before
    the last colon."""
    name, _, values = text.rpartition(":")
    parts = values.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"'{text}' is not [NAME:]LO,HI with two numbers (for example x:0,1)") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"'{text}': LO and HI must be finite")
    if lo > hi:
        raise ValueError(f"'{text}': LO must not exceed HI")
    return name, (lo, hi)


def parse_int_range(text: str) -> tuple[int, int]:
    """``"LO,HI"`` -> ``(LO, HI)`` (inclusive, LO <= HI); ValueError with a reason."""
    parts = text.split(",")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"'{text}' is not LO,HI with two integers (for example 0,255)") from None
    if lo > hi:
        raise ValueError(f"'{text}': LO must not exceed HI")
    return lo, hi


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def _fmt(shape: Sequence[Dim]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def resolve_shapes(
    specs: Sequence[InputSpec], given: Mapping[str, tuple[int, ...]], notes: list[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input (see the module docstring for the rules).

    Args:
        specs: the inputs to shape.
        given: shapes fixed by the caller (``--input-shape``, arrays of an input file).
        notes: when given, receives one line per dimension that was chosen by rule.

    Raises:
        InputShapeError: a given shape contradicts the model, or a dimension other
            than the first is unknown and not given.
    """
    by_name = {s.name: s for s in specs}
    for name in given:
        if name not in by_name:
            known = ", ".join(by_name) or "none"
            raise InputShapeError(f"--input-shape {name}: the model has no input '{name}' (inputs: {known})")
    symbols: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name not in given:
            continue
        shape = tuple(given[spec.name])
        if spec.dims is not None:
            if len(shape) != len(spec.dims):
                raise InputShapeError(
                    f"--input-shape {spec.name}: {len(shape)} dimension(s) given, the model declares "
                    f"{len(spec.dims)} {_fmt(spec.dims)}"
                )
            for axis, (d, v) in enumerate(zip(spec.dims, shape, strict=True)):
                if isinstance(d, int) and d != v:
                    raise InputShapeError(
                        f"--input-shape {spec.name}: dimension {axis} is {v}, the model fixes it to {d} "
                        f"{_fmt(spec.dims)}"
                    )
                if isinstance(d, str):
                    symbols.setdefault(d, v)
        shapes[spec.name] = shape
    for spec in specs:
        if spec.name in shapes:
            continue
        if spec.dims is None:
            raise InputShapeError(
                f"input '{spec.name}' has no shape in the model: give it with --input-shape {spec.name}:D0,D1,..."
            )
        out: list[int] = []
        unknown: list[int] = []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int):
                out.append(d)
            elif isinstance(d, str) and d in symbols:
                out.append(symbols[d])
            elif axis == 0:
                out.append(1)
                if isinstance(d, str):
                    symbols[d] = 1
                if notes is not None:
                    notes.append(f"input '{spec.name}': first dimension {d or '?'} set to 1 (batch)")
            else:
                out.append(-1)
                unknown.append(axis)
        if unknown:
            example = ",".join(str(v) if v >= 0 else _placeholder(spec.dims[i], i) for i, v in enumerate(out))
            which = ", ".join(f"{a} ({spec.dims[a] or '?'})" for a in unknown)
            raise InputShapeError(
                f"input '{spec.name}' {_fmt(spec.dims)} has unknown dimension(s) {which}: "
                f"give them with --input-shape {spec.name}:{example}"
            )
        shapes[spec.name] = tuple(out)
    return shapes


def _placeholder(d: Dim, axis: int) -> str:
    """What to show for an unknown dimension in the example: its symbol when it reads well."""
    if isinstance(d, str) and d.isidentifier() and len(d) <= 16:
        return d
    return f"D{axis}"


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


def generate(
    spec: InputSpec,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    int_range: tuple[int, int],
    val_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """One random array for ``spec`` (distributions in the module docstring)."""
    dt = spec.dtype
    if dt == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if dt.kind == "f" or dt == ml_dtypes.bfloat16:
        if val_range is not None:
            return rng.uniform(val_range[0], val_range[1], shape).astype(dt)
        return rng.standard_normal(shape).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        lo, hi = max(int_range[0], int(info.min)), min(int_range[1], int(info.max))
        if lo > hi:
            raise InputFileError(
                f"--input-range {int_range[0]},{int_range[1]} holds no value of input '{spec.name}' ({dt.name})"
            )
        return rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64).astype(dt)
    raise NotVerifiableError(f"input '{spec.name}' has dtype {dt.name}: bnfold cannot generate it")


def trial_rng(seed: int, trial: int) -> np.random.Generator:
    """Independent, reproducible generator of one trial."""
    return np.random.default_rng([seed, trial])


def check_feed(path: str, feed: Feed, specs: Sequence[InputSpec]) -> Feed:
    """Validate a file's arrays against the inputs: names, dtype kinds, declared dimensions.

    Arrays of another dtype of the same kind (float64 for float32) are cast.
    """
    by_name = {s.name: s for s in specs}
    out: Feed = {}
    for name, a in feed.items():
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(by_name) or "none"
            raise InputFileError(f"{path}: array '{name}' is not an input of the model (inputs: {known})")
        want = spec.dtype
        if a.dtype != want:
            if _kind(a.dtype) != _kind(want):
                raise InputFileError(f"{path}: array '{name}' is {a.dtype.name}, the input is {want.name}")
            a = a.astype(want)
        if spec.dims is not None:
            ok = len(a.shape) == len(spec.dims) and all(
                not isinstance(d, int) or d == v for d, v in zip(spec.dims, a.shape, strict=True)
            )
            if not ok:
                raise InputFileError(
                    f"{path}: array '{name}' has shape {list(a.shape)}, the input is {_fmt(spec.dims)}"
                )
        out[name] = a
    return out


def _kind(dt: np.dtype) -> str:
    return "f" if dt == ml_dtypes.bfloat16 else dt.kind


def check_size(shapes: Mapping[str, tuple[int, ...]], specs: Sequence[InputSpec]) -> None:
    """Refuse to generate inputs of more than :data:`MAX_GENERATED_BYTES` per trial.

    Raises:
        InputShapeError: naming the biggest input, its shape and its size (exit code 6).
    """
    by_name = {s.name: s for s in specs}
    sizes = {n: math.prod(shape) * by_name[n].dtype.itemsize for n, shape in shapes.items() if n in by_name}
    total = sum(sizes.values())
    if total > MAX_GENERATED_BYTES:
        name = max(sizes, key=lambda n: sizes[n])
        shape = ",".join(map(str, shapes[name]))
        raise InputShapeError(
            f"input '{name}' {by_name[name].dtype.name}[{shape}] is too big to generate: {sizes[name]} bytes "
            f"({total} for all inputs of a trial, at most {MAX_GENERATED_BYTES}); give a smaller shape with "
            f"--input-shape, or real data with --inputs"
        )


def _check_val_ranges(options: InputOptions, specs: Sequence[InputSpec]) -> None:
    by_name = {s.name: s for s in specs}
    for name in options.val_ranges:
        if not name:
            continue
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(by_name) or "none"
            raise InputShapeError(f"--val-range {name}: the model has no input '{name}' (inputs: {known})")
        if _kind(spec.dtype) != "f":
            raise InputShapeError(
                f"--val-range {name}: input '{name}' is {spec.dtype.name}, not float; use --input-range for integers"
            )


def make_inputs(model: onnx.ModelProto, options: InputOptions | None = None) -> InputPlan:
    """Feeds of every trial: input files first (one or more trials each), then generated trials.

    Raises:
        InputShapeError: a dimension cannot be chosen (see :func:`resolve_shapes`).
        InputFileError: an input file does not fit the model.
        NotVerifiableError: an input is not a tensor of a type bnfold can make.
    """
    options = options or InputOptions()
    specs = graph_inputs(model)
    _check_val_ranges(options, specs)
    feeds: list[Feed] = []
    sources: list[str] = []
    notes: list[str] = []
    first_file: Feed | None = None
    for path in options.files:
        for k, raw in enumerate(load_npz(path)):
            feed = check_feed(path, raw, specs)
            given = {**{n: a.shape for n, a in feed.items()}, **options.shapes}
            missing = [s for s in specs if s.name not in feed]
            if missing:
                shapes = resolve_shapes(specs, given, notes)
                rng = trial_rng(options.seed, 10_000 + len(feeds))
                check_size({s.name: shapes[s.name] for s in missing}, specs)
                for s in missing:
                    feed[s.name] = generate(s, shapes[s.name], rng, options.int_range, options.val_range(s.name))
                notes.append(f"{path}: generated {', '.join(s.name for s in missing)}")
            feeds.append(feed)
            sources.append(path if k == 0 else f"{path}#{k}")
            if first_file is None:
                first_file = feed
    trials = options.trials if options.trials is not None else (0 if options.files else DEFAULT_TRIALS)
    if trials:
        given = {n: a.shape for n, a in (first_file or {}).items()}
        given.update(options.shapes)
        shapes = resolve_shapes(specs, given, notes)
        check_size(shapes, specs)
        for t in range(trials):
            rng = trial_rng(options.seed, t)
            feeds.append(
                {s.name: generate(s, shapes[s.name], rng, options.int_range, options.val_range(s.name)) for s in specs}
            )
            sources.append(f"generated #{t + 1} (seed {options.seed})")
    if not feeds:
        raise InputFileError("no inputs to verify with: --trials 0 and no --inputs file")
    return InputPlan(specs, feeds, sources, _dedupe(notes))


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))
