"""Seeded, bounded fuzzing of the sample models: every mutant gets a documented outcome.

For each mutant (bit flips, truncation, deleted and duplicated fields, swapped
dtypes, absurd dims) ``bnfold fold`` must end with an exit code from the
documented table and never with an internal error, leave no file behind unless
it succeeded, and leave the input unchanged.  Mutants that once broke bnfold are
kept in ``tests/fixtures/fuzz/`` and replayed.
"""

from __future__ import annotations

import glob
import os
import random

import onnx
import pytest
from onnx import TensorProto

from bnfold.errors import ExitCode
from bnfold.jobs import FoldOptions, fold_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = sorted(glob.glob(os.path.join(ROOT, "models", "*.onnx")))
FIXTURES = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "fuzz", "*.onnx")))
CASES_PER_SAMPLE = 400
DTYPES = [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BFLOAT16, TensorProto.STRING,
          TensorProto.INT8, TensorProto.BOOL, 0, 999]  # fmt: skip


def _bytes_mutation(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "truncate", "splice"])
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buf[rng.randrange(1, len(buf)) :]
    else:
        i, j = sorted(rng.sample(range(len(buf)), 2))
        buf[i:i] = buf[i:j]
    return bytes(buf)


def _proto_mutation(model: onnx.ModelProto, rng: random.Random) -> onnx.ModelProto:
    g = model.graph
    kind = rng.choice(["del_node", "dup_node", "del_init", "dup_init", "dtype", "dims", "del_input", "attr", "io"])
    if kind == "del_node" and len(g.node):
        del g.node[rng.randrange(len(g.node))]
    elif kind == "dup_node" and len(g.node):
        g.node.add().CopyFrom(g.node[rng.randrange(len(g.node))])
    elif kind == "del_init" and len(g.initializer):
        del g.initializer[rng.randrange(len(g.initializer))]
    elif kind == "dup_init" and len(g.initializer):
        g.initializer.add().CopyFrom(g.initializer[rng.randrange(len(g.initializer))])
    elif kind == "dtype" and len(g.initializer):
        g.initializer[rng.randrange(len(g.initializer))].data_type = rng.choice(DTYPES)
    elif kind == "dims" and len(g.initializer):
        t = g.initializer[rng.randrange(len(g.initializer))]
        absurd = rng.choice([0, -1, 2**40, 3, 1])
        if len(t.dims):
            t.dims[rng.randrange(len(t.dims))] = absurd
        else:
            t.dims.append(absurd)
    elif kind == "del_input" and len(g.node):
        n = g.node[rng.randrange(len(g.node))]
        if len(n.input):
            del n.input[rng.randrange(len(n.input))]
    elif kind == "attr" and len(g.node):
        n = g.node[rng.randrange(len(g.node))]
        n.attribute.add().CopyFrom(onnx.helper.make_attribute(rng.choice(["group", "epsilon", "pads", "transB",
                                                                           "training_mode"]),
                                                              rng.choice([0, 3, -1, 1e30, [9, 9, 9, 9]])))  # fmt: skip
    elif kind == "io" and len(g.input):
        g.input[0].type.tensor_type.elem_type = rng.choice(DTYPES)
    return model


def mutants(seed: int = 20261126) -> list[tuple[str, bytes]]:
    """Deterministic list of ``(label, bytes)`` mutants of the sample models."""
    rng = random.Random(seed)
    out = []
    for path in SAMPLES:
        data = open(path, "rb").read()
        for k in range(CASES_PER_SAMPLE):
            label = f"{os.path.basename(path)}#{k}"
            if k % 2:
                out.append((label, _bytes_mutation(data, rng)))
            else:
                m = onnx.load_from_string(data)
                for _ in range(rng.randint(1, 3)):
                    m = _proto_mutation(m, rng)
                out.append((label, m.SerializeToString()))
    return out


DOCUMENTED = {int(c) for c in ExitCode}


def _run_case(tmp_path, data: bytes) -> tuple[int, str | None]:
    src = tmp_path / "in.onnx"
    src.write_bytes(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    for f in out_dir.iterdir():
        f.unlink()
    out = out_dir / "o.onnx"
    outcome = fold_job(str(src), str(out), FoldOptions())
    assert src.read_bytes() == data, "input changed"
    code = int(outcome.exit_code)
    assert code in DOCUMENTED
    left = sorted(os.listdir(out_dir))
    if code == 0:
        assert left == ["o.onnx"], left
        onnx.checker.check_model(str(out), full_check=True)
    else:
        assert left == [], left
        assert outcome.error and "\n" not in outcome.error
    assert outcome.traceback is None
    return code, outcome.error


def test_fuzz_sample_mutants(tmp_path) -> None:
    failures = []
    for label, data in mutants():
        code, err = _run_case(tmp_path, data)
        if code == ExitCode.INTERNAL:
            failures.append(f"{label}: {err}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("path", FIXTURES, ids=[os.path.basename(p) for p in FIXTURES])
def test_fuzz_regressions(tmp_path, path: str) -> None:
    code, err = _run_case(tmp_path, open(path, "rb").read())
    assert code != ExitCode.INTERNAL, err


@pytest.mark.parametrize("path", FIXTURES, ids=[os.path.basename(p) for p in FIXTURES])
def test_fuzz_regressions_through_the_api(path: str) -> None:
    """``fold_model`` on a mutant either folds or raises a documented BnfoldError."""
    import bnfold
    from bnfold.errors import BnfoldError

    try:
        model = onnx.load(path)
    except Exception:  # noqa: BLE001 - a mutant onnx itself cannot parse is not bnfold's business
        pytest.skip("onnx cannot parse this mutant")
    try:
        bnfold.fold_model(model)
    except BnfoldError as e:
        assert e.exit_code == ExitCode.INVALID_MODEL
