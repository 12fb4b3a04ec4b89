"""The blocked weight products round exactly like one float64 product rounded once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.fold import math as fm

DTYPES = [np.float16, np.float32, np.float64]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    block=st.sampled_from([1, 3, 16, 1 << 16]),
    along=st.sampled_from(["rows", "columns"]),
    seed=st.integers(0, 2**16),
)
def test_blocked_product_equals_float64_rounded_once(shape, dtype, block, along, seed) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 10).astype(dtype)
    n = shape[0] if along == "rows" else shape[-1]
    s = rng.standard_normal(n) * rng.choice([1e-3, 1.0, 7.0])
    factor = s.reshape((n,) + (1,) * (len(shape) - 1)) if along == "rows" else s
    saved, fm._BLOCK = fm._BLOCK, block
    try:
        got = fm._scaled(w, factor, np.dtype(dtype))
    finally:
        fm._BLOCK = saved
    want = (w.astype(np.float64) * factor).astype(dtype)
    assert got.dtype == np.dtype(dtype)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_blocked_product_of_a_big_conv_weight() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 64, 3, 3)).astype(np.float32)  # 73,728 weights: more than one block
    assert w.size > fm._BLOCK
    s, t = rng.standard_normal(128), rng.standard_normal(128)
    got, _ = fm.fold_conv(w, None, s, t, weight_dtype=np.dtype(np.float32))
    want = (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_blocked_overflow_is_reported_not_wrapped(monkeypatch) -> None:
    monkeypatch.setattr(fm, "_BLOCK", 4)
    w = np.full((8, 4), 60000.0, dtype=np.float16)
    s = np.ones(8)
    s[5] = 4.0  # 240000 > float16 max
    out = fm._scaled_rows(w, s, np.dtype(np.float16))
    with pytest.raises(fm.FoldValueError) as e:
        fm.round_to(out, np.float16, "weight")
    assert e.value.code == "dtype_overflow"
