"""Shared fixtures: paths of sample models and the onnx light model zoo."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODELS = os.path.join(ROOT, "models")


@pytest.fixture
def models_dir() -> str:
    return MODELS
