"""Typed errors. Every message is one line and names the file or node it is about."""

from __future__ import annotations


class LRPError(Exception):
    """Base class of every error lrp_onnx raises on purpose (the CLI prints these as one line).

    Control characters in the message (a newline in a corrupt node name, say) are escaped, so
    the message is always one line.
    """

    def __init__(self, message: str = "") -> None:
        text = str(message)
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            text = "".join(c if 32 <= ord(c) != 127 else repr(c)[1:-1] for c in text)
        super().__init__(text)


class ModelLoadError(LRPError):
    """The input is not a readable, valid ONNX model."""


class UnsupportedModel(LRPError):
    """The model is valid ONNX but outside what the compiler handles (inputs, outputs, shapes)."""


class InvalidInput(LRPError):
    """An input array or target given to a compiled model does not fit it (dtype, shape)."""


class RuntimeFailure(LRPError):
    """ONNX Runtime refused to load or failed to run a compiled model."""


class UnsupportedOp(LRPError):
    """One or more nodes on the relevance path have no relevance emitter."""


class UnsupportedAttribute(LRPError):
    """A node uses an attribute value its emitter does not handle."""


class RuleNotApplicable(LRPError):
    """A rule was assigned to a layer it cannot handle."""


class RuleAssignmentError(LRPError):
    """Rules given by the user do not match the model's layers (count, structure, index)."""


class CanonizerError(LRPError):
    """A canonicalisation pass refused the model."""


def node_label(name: str, op_type: str, opset: int | None = None) -> str:
    """Format a node reference the same way in every message: ``'name' (Conv, opset 17)``."""
    if opset is None:
        return f"'{name}' ({op_type})"
    return f"'{name}' ({op_type}, opset {opset})"
