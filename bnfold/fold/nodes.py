"""Reading ONNX nodes: attributes, display names, which domain an op is from."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

STANDARD_DOMAINS = ("", "ai.onnx")


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Attribute value of ``node`` or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (or add) an attribute, keeping the others in place."""
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))


def display_name(node: onnx.NodeProto) -> str:
    """A node's name, or ``op(output)`` for unnamed nodes."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def is_standard(node: onnx.NodeProto | None, *op_types: str) -> bool:
    """True for a node of the default ONNX domain (of one of ``op_types`` when given)."""
    return node is not None and node.domain in STANDARD_DOMAINS and (not op_types or node.op_type in op_types)
