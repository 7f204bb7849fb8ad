"""``lrp-onnx explain`` for a model compiled on token ids: reading ids, feeding the attention
mask, printing the top tokens and writing a coloured-token HTML page per sequence.

Inputs are token ids, never text: tokenizing belongs to the model's tokenizer. A ``.npy`` file
holds one sequence ``[T]`` or a batch ``[N, T]``; a text file holds one sequence per line as
whitespace-separated integers. Sequences of different lengths are right-padded with id 0 and
their attention mask is 0 there, as HF tokenizers pad.
"""

from __future__ import annotations

import argparse
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrp_onnx.cli.argtypes import positive_int
from lrp_onnx.cli.inputs import InputFileError, open_npy
from lrp_onnx.dtypes import ORT_DTYPES
from lrp_onnx.errors import InvalidInput

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
    arr = open_npy(path)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2) or arr.size == 0:
        raise InputFileError(path, f"token ids must be a non-empty integer array [T] or [N, T] "
                             f"(got {arr.dtype} {list(arr.shape)})")
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


def add_token_options(p: argparse.ArgumentParser) -> None:
    """``explain``'s options for token ids."""
    g = p.add_argument_group("token ids (a model compiled on input_ids: .npy [T] or [N, T], "
                             "or a text file with one sequence of ids per line)")
    g.add_argument("--position", type=int, default=None, metavar="P",
                   help="a language model's explained position, counted from each sequence's "
                   "start, or from its end when negative (default: -1, its last token)")
    g.add_argument("--vocab", metavar="FILE",
                   help="token strings, one per line by id (a tokenizer's vocab.txt), for the "
                   "printed top tokens and the HTML")
    g.add_argument("--top", type=positive_int, default=5, metavar="K",
                   help="print the K most relevant tokens of each sequence (default: 5)")


@dataclass(frozen=True)
class TokenJob:
    """What ``explain`` runs on a model compiled on token ids."""

    sequences: list[TokenSequence]
    vocab: list[str] | None
    out: Path | None


def read_tokens(args: Any, io: Any, label: str) -> TokenJob:
    """Read and check every input before anything runs (``--position``, the ids, the output
    folder)."""
    from lrp_onnx.cli.outputs import check_out_dir

    if args.position is not None and not io.positions:
        raise InvalidInput(f"--position: {label} explains a [batch, classes] output; positions "
                           "apply to a sequence output [batch, positions, classes]")
    sequences = read_sequences(args.inputs)
    check_ids(sequences, io.tokens)
    if io.positions and args.position is not None:
        short = min(len(s.ids) for s in sequences)
        if not -short <= args.position < short:
            raise InvalidInput(f"--position {args.position} is outside a sequence of {short} "
                               "tokens")
    out = Path(args.out) if args.out else None
    if out is not None:
        stems = [s.stem for s in sequences]
        twice = next((s for s in stems if stems.count(s) > 1), None)
        if twice is not None:
            raise InvalidInput(f"two inputs would write the same files ({out / twice}.*); "
                               "rename one or explain them separately")
        check_out_dir(out)
    return TokenJob(sequences, read_vocab(args.vocab), out)


def explain_tokens(job: TokenJob, session: Any, io: Any, args: Any) -> int:
    """Run the compiled model on the sequences in batches; print the target, the relevance sum
    and the top tokens of each; with ``--out`` write ``<stem>.relevance.npy`` (one value per
    token) and ``<stem>.html``."""
    from lrp_onnx.cli.outputs import OutputError, save_bytes, save_npy
    from lrp_onnx.runtime import run_compiled

    types = {i.name: ORT_DTYPES.get(i.type, np.int64) for i in session.get_inputs()}
    asked = -1 if args.position is None else args.position
    written = 0
    for start in range(0, len(job.sequences), args.batch_size):
        chunk = job.sequences[start:start + args.batch_size]
        ids, mask = batch(chunk)
        position = [len(s.ids) + asked if asked < 0 else asked for s in chunk] \
            if io.positions else None
        expl = run_compiled(session, ids.astype(types[io.input]), args.target, io.input,
                            io.output, io.classes, inputs=other_feeds(io.others, ids, mask, types),
                            position=position)
        for i, s in enumerate(chunk):
            rel = np.asarray(expl.relevance[i][:len(s.ids)])
            words = token_text(s.ids, job.vocab)
            scores, where = np.asarray(expl.output[i]), ""
            if expl.position is not None:
                where = f" at position {int(expl.position[i])}"
                scores = scores[int(expl.position[i])]
            t = int(expl.target[i])
            print(f"{s.label}: target {t}{where} (output {float(scores.reshape(-1)[t]):.4g}), "
                  f"relevance sum {float(rel.sum()):.4g}; top tokens: "
                  f"{top_tokens(rel, words, args.top)}")
            if not np.isfinite(rel).all():
                raise InvalidInput(f"{s.path}: the relevance of {s.label} is not finite "
                                   "(NaN/Inf); nothing written for it; run 'lrp-onnx check' "
                                   "on the model")
            if job.out is None:
                continue
            try:
                job.out.mkdir(parents=True, exist_ok=True)
                save_npy(rel, job.out / f"{s.stem}.relevance.npy")
                save_bytes(page(f"{s.label}: target {t}{where}", words, rel).encode(),
                           job.out / f"{s.stem}.html")
            except OSError as exc:
                raise OutputError(f"{exc.filename or job.out}: cannot write "
                                  f"({exc.strerror or exc})") from None
            written += 2
    print(f"explained {len(job.sequences)} sequence(s)" +
          (f"; wrote {written} files to {job.out}" if job.out is not None else ""))
    return 0
