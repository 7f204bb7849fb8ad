"""``lrp-onnx explain`` for a model compiled on token ids: reading ids, feeding the attention
mask, printing the top tokens and writing a coloured-token HTML page per sequence.

Inputs are token ids, never text: tokenizing belongs to the model's tokenizer. A ``.npy`` file
holds one sequence ``[T]`` or a batch ``[N, T]``; a text file holds one sequence per line as
whitespace-separated integers. Sequences of different lengths are right-padded with id 0 and
their attention mask is 0 there, as HF tokenizers pad.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrp_onnx.cli.inputs import InputFileError

#: Model inputs ``explain`` fills for a text model: the padding mask, and zeros.
MASK_WORD, ZERO_INPUTS = "mask", ("token_type_ids",)


@dataclass(frozen=True)
class TokenSequence:
    """One sequence of ids and where it came from."""

    path: str
    label: str
    stem: str
    ids: np.ndarray


def read_sequences(paths: Sequence[str]) -> list[TokenSequence]:
    """The sequences of every input file (``.npy``: ``[T]`` or ``[N, T]`` integers; any other
    file: one sequence of whitespace-separated integers per non-empty line)."""
    found: list[TokenSequence] = []
    for name in paths:
        path = Path(name)
        rows = _read_npy(path) if path.suffix.lower() == ".npy" else _read_text(path)
        if not rows:
            raise InputFileError(path, "holds no token ids")
        for i, row in enumerate(rows):
            one = len(rows) == 1
            found.append(TokenSequence(str(path), path.name if one else f"{path.name}[{i}]",
                                   path.stem if one else f"{path.stem}_{i}", row))
    return found


def _read_npy(path: Path) -> list[np.ndarray]:
    try:
        arr = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputFileError(path, "not a readable .npy array "
                             f"({str(exc).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.integer) \
            or arr.ndim not in (1, 2) or arr.size == 0:
        shape = list(getattr(arr, "shape", []))
        raise InputFileError(path, f"token ids must be a non-empty integer array [T] or [N, T] "
                             f"(got {getattr(arr, 'dtype', type(arr).__name__)} {shape})")
    return [np.asarray(r, np.int64) for r in (arr[None] if arr.ndim == 1 else arr)]


def _read_text(path: Path) -> list[np.ndarray]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputFileError(path, "not a text file of token ids (.npy or one sequence of "
                             "integers per line)") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(np.array([int(v) for v in line.split()], np.int64))
        except ValueError:
            raise InputFileError(path, f"line {number}: not whitespace-separated integer "
                                 "token ids") from None
    return rows


def read_vocab(path: str | os.PathLike[str] | None) -> list[str] | None:
    """Token strings by id: one per line (a tokenizer's ``vocab.txt``)."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"cannot read the vocabulary ({exc})") from None


def check_ids(sequences: Sequence[TokenSequence], vocab_size: int | None) -> None:
    """Every id within ``[0, vocab_size)`` (the embedding table's rows)."""
    for s in sequences:
        bad = (s.ids < 0) | (s.ids >= (vocab_size or np.iinfo(np.int64).max))
        if bad.any():
            raise InputFileError(s.path, f"{s.label}: token id {int(s.ids[bad][0])} is outside "
                                 f"the embedding's [0, {vocab_size})")


def batch(sequences: Sequence[TokenSequence]) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``[N, T]`` right-padded with 0 and the attention mask (1 on tokens, 0 on padding)."""
    length = max(len(s.ids) for s in sequences)
    ids = np.zeros((len(sequences), length), np.int64)
    mask = np.zeros((len(sequences), length), np.int64)
    for i, s in enumerate(sequences):
        ids[i, :len(s.ids)] = s.ids
        mask[i, :len(s.ids)] = 1
    return ids, mask


def other_feeds(names: Sequence[str], ids: np.ndarray, mask: np.ndarray,
                types: dict[str, Any]) -> dict[str, np.ndarray]:
    """Values for the model's other inputs: the padding mask for ``*mask*`` inputs, zeros for
    ``token_type_ids``; anything else is refused (``explain`` cannot know it)."""
    feeds = {}
    for name in names:
        if MASK_WORD in name.lower():
            feeds[name] = mask.astype(types[name])
        elif name in ZERO_INPUTS:
            feeds[name] = np.zeros_like(ids).astype(types[name])
        else:
            raise InputFileError(name, "this input of the model cannot be filled by 'explain' "
                                 "(it feeds the token ids and the attention mask): use the "
                                 "Python API (analyze(ids, inputs={name: array}))")
    return feeds


def token_text(ids: np.ndarray, vocab: list[str] | None) -> list[str]:
    return [vocab[i] if vocab is not None and i < len(vocab) else str(int(i)) for i in ids]


def top_tokens(rel: np.ndarray, words: list[str], k: int) -> str:
    """The ``k`` tokens of largest relevance: ``'word'@position +0.123``."""
    order = np.argsort(-rel, kind="stable")[:k]
    return ", ".join(f"{words[i]!r}@{i} {float(rel[i]):+.4g}" for i in order)


def page(title: str, words: list[str], rel: np.ndarray) -> str:
    """An HTML page with each token on a background of its relevance (red > 0, blue < 0,
    full colour at the sequence's largest ``|R|``) and the value in its tooltip."""
    top = float(np.max(np.abs(rel))) or 1.0
    spans = []
    for i, (word, r) in enumerate(zip(words, rel)):
        a = min(abs(float(r)) / top, 1.0)
        colour = f"rgba(220, 40, 40, {a:.3f})" if r >= 0 else f"rgba(40, 80, 220, {a:.3f})"
        spans.append(f'<span style="background:{colour}" title="{i}: {float(r):+.6g}">'
                     f"{html.escape(word)}</span>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n"
            "<body style=\"font-family: monospace; line-height: 1.8\">\n"
            f"<p>{html.escape(title)}</p>\n<p>{' '.join(spans)}</p>\n</body></html>\n")
