"""Safe parsing of the spellings ``Name`` and ``Name(numeric args, numeric kwargs)``.

Composite presets (``"EpsilonGammaBox(low=-3.0, high=3.0)"``, see
:func:`lrp_onnx.rules.presets.parse_composite`) and rules (``"EpsilonRule(epsilon=1e-6)"``,
see :func:`lrp_onnx.rules.rulefile.parse_rule`) are written this way on the command line and in
rule files. The text is parsed with :mod:`ast` and nothing is evaluated: every argument must be a
number literal, optionally signed (``-3``, ``+1e-6``, ``--2``). This module only splits the text
into a name and arguments; looking the name up, and wording the error for the user, is the
caller's part: it catches the :class:`SpellingError` subclasses below.
"""

from __future__ import annotations

import ast
import warnings
from typing import Any, Literal

from lrp_onnx.errors import LRPError


class SpellingError(LRPError):
    """The text is not a spelling :func:`parse_spelling` accepts (callers word the message)."""


class NotACallError(SpellingError):
    """The text is not ``Name`` or ``Name(...)``: a syntax error, an attribute, an operator ..."""


class NotANumberError(SpellingError):
    """An argument is not a (signed) number literal: a string, a list, a call, ``*args`` ..."""


class BadKeywordsError(SpellingError):
    """A ``**mapping`` argument or a repeated keyword (``keywords="strict"`` only)."""


def _number(node: ast.expr, booleans: bool, arrays: bool = False) -> Any:
    ops = []  # unary signs, outermost first (read in a loop: ``------1`` nests deeply)
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        ops.append(node.op)
        node = node.operand
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and \
            (booleans or not isinstance(node.value, bool)):
        value = node.value
        for op in reversed(ops):
            value = -value if isinstance(op, ast.USub) else value
        return value
    if arrays and not ops and isinstance(node, (ast.List, ast.Tuple)):
        return [_number(e, booleans, arrays) for e in node.elts]
    raise NotANumberError("arguments must be number literals")


def quoted(text: str, limit: int = 80) -> str:
    """``repr(text)`` for an error message, cut to about ``limit`` characters (a spelling is
    echoed back to the user, who may have passed pages of it)."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"


def parse_spelling(text: str, *, booleans: bool = False,
                   keywords: Literal["strict", "loose"] = "strict", arrays: bool = False
                   ) -> tuple[str, list[Any], dict[str, Any]]:
    """Split ``"Name"`` or ``"Name(1, -2.5, key=3e-4)"`` into ``(name, args, kwargs)``.

    Surrounding whitespace is ignored; ``"Name"`` and ``"Name()"`` both give ``(name, [], {})``.
    Arguments are read left to right, positional ones first.

    Args:
        text: the spelling.
        booleans: also accept ``True``/``False`` as arguments (returned as they are; a signed
            one is an int: ``-True`` is ``-1``). Otherwise a boolean is not a number.
        keywords: how ``**mapping`` arguments and repeated keywords are refused.
            ``"strict"``: either raises :class:`BadKeywordsError`, checked after every argument
            was read (a non-number argument is reported first).
            ``"loose"``: a ``**mapping`` argument makes the text :class:`NotACallError`,
            checked before any argument is read; a repeated keyword keeps its last value.
        arrays: also accept (nested) lists or tuples of number literals (ZBox bounds, as
            :meth:`~lrp_onnx.rules.core.Rule.spelling` writes them); returned as lists.

    Raises:
        NotACallError: the text does not parse or is not a name or a call of a name.
        NotANumberError: an argument (``*args`` included) is not a number literal.
        BadKeywordsError: see ``keywords``.
    """
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and the like: not ours to print
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # null bytes, deep nesting
        raise NotACallError(f"{text!r} does not parse") from None
    if isinstance(tree, ast.Name):
        return tree.id, [], {}
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise NotACallError(f"{text!r} is not a name or a call of a name")
    named = [k for k in tree.keywords if k.arg is not None]
    if keywords == "loose" and len(named) != len(tree.keywords):
        raise NotACallError(f"{text!r} has a **mapping argument")
    try:
        args = [_number(a, booleans, arrays) for a in tree.args]
        kwargs = {str(k.arg): _number(k.value, booleans, arrays) for k in named}
    except RecursionError:  # lists nested thousands deep
        raise NotANumberError("arguments nest too deeply") from None
    if keywords == "strict" and len(kwargs) != len(tree.keywords):
        raise BadKeywordsError(f"{text!r} has a **mapping argument or a repeated keyword")
    return tree.func.id, args, kwargs


__all__ = ["BadKeywordsError", "NotACallError", "NotANumberError", "SpellingError",
           "parse_spelling", "quoted"]
