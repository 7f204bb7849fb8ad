"""The LXT 2.1 oracle for Hugging Face BERT, GPT-2 and Llama models (the text tier's reference).

* :func:`tiny_text_model` builds a small random-weight ``BertForSequenceClassification``,
  ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (eager attention, no KV cache) with every
  parameter drawn from a seeded generator; :data:`text_model_sizes` makes the same function
  build BERT-base and GPT-2-small sized models for benchmarks.
* :func:`export_text` exports one to a self-contained ONNX file (inputs ``input_ids`` and
  ``attention_mask``, int64 ``[N, T]``; output ``logits``) with the legacy or the dynamo
  exporter, dynamic ``N`` and ``T``, and checks it on ONNX Runtime's CPU EP.
* :func:`lxt_text_relevances` computes token relevances with LXT 2.1 (``lxt.efficient``):
  ``R = emb * dL/demb`` at the word-embedding output, ``L = sum_i logits[i, target[i]]``.
  LXT patches classes process-wide, and its patches cannot be stacked (a second map on a
  patched class is refused with a warning, so CP-LRP after AttnLRP would silently stay AttnLRP):
  each mode runs in its own child process. The model travels as ``torch.save``, the arrays as
  ``.npz`` files.

numpy and torch are imported inside the functions: importing this module imports neither torch
nor LXT. LXT 2.1 needs ``transformers`` < 4.55 (``pip install ".[test]"`` pins 4.52.4).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lrp_onnx.testing.transformers import child_main, inline_external_data, run_child

Kind = Literal["bert", "gpt2", "llama"]
Exporter = Literal["legacy", "dynamo"]
TextMode = Literal["attnlrp", "cp"]

#: kind -> (HF modeling module, config class, model class, LXT maps by mode, tiny config).
_KINDS: dict[str, tuple[str, str, str, dict[str, str], dict[str, Any]]] = {
    "bert": ("transformers.models.bert.modeling_bert", "BertConfig",
             "BertForSequenceClassification", {"attnlrp": "attnLRP"},
             {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64,
              "num_labels": 2}),
    "gpt2": ("transformers.models.gpt2.modeling_gpt2", "GPT2Config", "GPT2LMHeadModel",
             {"attnlrp": "attnLRP", "cp": "cp_LRP"},
             {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 64}),
    "llama": ("transformers.models.llama.modeling_llama", "LlamaConfig", "LlamaForCausalLM",
              {"attnlrp": "attnLRP", "cp": "cp_LRP"},
              {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100}),
}
#: HF config overrides for full-size models, e.g.
#: ``tiny_text_model("bert", **text_model_sizes["bert-base"])``.
text_model_sizes: dict[str, dict[str, Any]] = {
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512},
    "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                   "n_positions": 1024},
}


# -- the model ------------------------------------------------------------------------------------
def _spec(kind: str) -> tuple[str, str, str, dict[str, str], dict[str, Any]]:
    """The :data:`_KINDS` row of ``kind``; ``ValueError`` for any other model type."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, not {kind!r}")
    return _KINDS[kind]


def _build(kind: str, config_dict: dict[str, Any]) -> Any:
    """An eval-mode model of ``kind`` with eager attention, its classes looked up in the HF
    modeling module now (so that a model built after LXT's BERT ``replace_module`` is LXT's)."""
    module_name, config_cls, model_cls, _, _ = _spec(kind)
    module = importlib.import_module(module_name)
    config = getattr(module, config_cls).from_dict(config_dict)
    config._attn_implementation = "eager"
    return getattr(module, model_cls)(config).eval()


def tiny_text_model(kind: Kind, seed: int = 0, **overrides: Any) -> Any:
    """A small random-weight HF text model in eval mode (eager attention, ``use_cache=False``).

    The configs are those of ``docs/notes/text-models-survey.md`` section 0. Every parameter is
    drawn from a generator seeded with ``seed`` (in registration order; the global torch RNG is
    left as it was): norm weights (LayerNorm, RMSNorm) ``1 + 0.1 N(0,1)``, all other weights and
    biases ``N(0, 0.2)``. HF's zero biases and unit norm weights would make the dynamo exporter
    merge identical initializers; at this scale BERT's logits vary across inputs by ~0.2.
    Llama has no biases (CP-LRP then conserves exactly).

    Args:
        kind: ``"bert"`` (``BertForSequenceClassification``, 2 labels), ``"gpt2"``
            (``GPT2LMHeadModel``) or ``"llama"`` (``LlamaForCausalLM``, GQA with 2 KV heads).
        seed: seed of the weights.
        **overrides: HF config fields that replace the tiny ones (see :data:`text_model_sizes`).

    Returns:
        The ``transformers`` model.
    """
    import torch

    config = {**_spec(kind)[4], "use_cache": False, **overrides}
    with torch.random.fork_rng(devices=[]):  # HF's own initialisation draws from the global RNG
        model = _build(kind, config)
    norms = {f"{name}.weight" for name, module in model.named_modules()
             if "Norm" in type(module).__name__}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights (GPT-2's lm_head) appear once
            if name in norms:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def save_text_model(model: Any, path: str | os.PathLike[str]) -> Path:
    """Save ``{"kind", "config": config.to_dict(), "state_dict"}`` to ``path`` (read by
    :func:`load_text_model` and accepted by :func:`lxt_text_relevances`)."""
    import torch

    path = Path(path)
    kind = model.config.model_type
    _spec(kind)  # refuses model types load_text_model cannot rebuild
    torch.save({"kind": kind, "config": model.config.to_dict(),
                "state_dict": model.state_dict()}, path)
    return path


def load_text_model(path: str | os.PathLike[str]) -> Any:
    """Rebuild the eval-mode model saved by :func:`save_text_model` (eager attention)."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = _build(saved["kind"], saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model


def torch_text_logits(model: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The float32 logits of ``model`` (BERT ``[N, labels]``, LMs ``[N, T, V]``), no gradient."""
    import torch

    ids, mask = (torch.as_tensor(np.asarray(a, np.int64)) for a in (input_ids, attention_mask))
    extra = {} if model.config.model_type == "bert" else {"use_cache": False}
    with torch.no_grad():
        return np.asarray(model(input_ids=ids, attention_mask=mask, **extra).logits.numpy())


# -- ONNX export ----------------------------------------------------------------------------------
def ort_text_logits(path: str | os.PathLike[str], input_ids: np.ndarray,
                    attention_mask: np.ndarray) -> np.ndarray:
    """Run an exported text model on ONNX Runtime's CPU EP (one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.asarray(input_ids, np.int64),
             "attention_mask": np.asarray(attention_mask, np.int64)}
    return np.asarray(sess.run(["logits"], feeds)[0])


def text_batch(n: int, t: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ``input_ids`` and a right-padded ``attention_mask``, int64 ``[n, t]``: row ``i``
    has its last ``min(3 i, t - 1)`` tokens padded (row 0 none)."""
    ids = np.random.default_rng(seed).integers(0, vocab, (n, t), dtype=np.int64)
    mask = np.ones((n, t), np.int64)
    for i in range(1, n):
        mask[i, t - min(3 * i, t - 1):] = 0
    return ids, mask


def export_text(model: Any, path: str | os.PathLike[str], *, exporter: Exporter,
                opset: int) -> Path:
    """Export a text model to a single self-contained ONNX file and check it on ONNX Runtime.

    A wrapper ``forward(input_ids, attention_mask) -> model(...).logits`` is exported on a
    batch of 2 sequences of 8 tokens (the second right-padded), with ``N`` and ``T`` symbolic.

    Args:
        model: an eval-mode model of :func:`tiny_text_model` (before any LXT patching).
        path: the ``.onnx`` file to write.
        exporter: ``"legacy"`` (TorchScript, ``dynamic_axes``; opset 17 tested) or
            ``"dynamo"`` (``torch.export`` with ``Dim("N")`` and ``Dim("T", max=`` the
            model's maximum positions ``)``; opset 20 tested).
        opset: ONNX opset.

    Returns:
        ``path``: inputs ``input_ids``, ``attention_mask`` int64 ``[N, T]``; output ``logits``
        ``[N, labels]`` (BERT) or ``[N, T, V]`` (GPT-2, Llama).

    Raises:
        RuntimeError: if ONNX Runtime fails or its logits differ from torch's by more than
            ``1e-4 max(1, max|logits|)`` at ``(N, T)`` = (2, 8), (1, 5) or (3, 11).
    """
    import torch

    path = Path(path)
    lm = model.config.model_type != "bert"
    extra = {"use_cache": False} if lm else {}

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    wrapper = Logits().eval()  # export restores the wrapper's mode, recursively: eval, as model
    example = tuple(torch.as_tensor(a) for a in text_batch(2, 8, model.config.vocab_size))
    names: dict[str, Any] = {"input_names": ["input_ids", "attention_mask"],
                             "output_names": ["logits"]}
    with warnings.catch_warnings():  # TracerWarnings (legacy), axis renaming notes (dynamo)
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            nt = {0: "N", 1: "T"}
            axes = {"input_ids": nt, "attention_mask": nt, "logits": nt if lm else {0: "N"}}
            torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=opset,
                              dynamic_axes=axes, **names)
        elif exporter == "dynamo":
            dims = {0: torch.export.Dim("N"),
                    1: torch.export.Dim("T", max=model.config.max_position_embeddings)}
            torch.onnx.export(wrapper, example, str(path), dynamo=True, opset_version=opset,
                              dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                              external_data=False, verbose=False, **names)
        else:
            raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
    inline_external_data(path)
    for n, t in ((2, 8), (1, 5), (3, 11)):
        ids, mask = text_batch(n, t, model.config.vocab_size, seed=n)
        want = torch_text_logits(model, ids, mask)
        try:
            got = ort_text_logits(path, ids, mask)
        except Exception as exc:
            raise RuntimeError(f"ONNX Runtime cannot run {path.name} ({exporter}, opset {opset}) "
                               f"at (N, T) = ({n}, {t}): {exc}") from exc
        err = float(np.max(np.abs(got - want))) if got.shape == want.shape else np.inf
        if not err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))):
            raise RuntimeError(f"{path.name} ({exporter}, opset {opset}): ONNX Runtime logits "
                               f"{got.shape} differ from torch's {want.shape} at (N, T) = "
                               f"({n}, {t}): max|diff| = {err:.3g}")
    return path


# -- the LXT oracle (child processes) -------------------------------------------------------------
def lxt_text_relevances(model: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                        target: np.ndarray, position: np.ndarray | int | None = None,
                        modes: Sequence[TextMode] = ("attnlrp",), *,
                        timeout: float = 900) -> dict[str, dict[str, np.ndarray]]:
    """Token relevances of LXT 2.1 on a BERT, GPT-2 or Llama model, one child process per mode.

    The patched model (built after ``monkey_patch``) runs on ``emb`` = the word embeddings of
    ``input_ids`` with ``attention_mask``; the explained value of sample ``i`` is
    ``logits[i, target[i]]`` (BERT) or ``logits[i, position[i], target[i]]`` (LMs), seeded with
    1, and ``R = emb * dL/demb``. The child checks that the patched logits equal the model's.

    Args:
        model: a model of :func:`tiny_text_model`, or the path of a :func:`save_text_model` file.
        input_ids: int ``[N, T]`` token ids.
        attention_mask: int ``[N, T]``, 0 at padded tokens.
        target: int ``[N]`` class or token to explain; -1 explains the row's largest logit.
        position: LMs only: the position ``[N]`` (or one int for all) whose next-token logits
            are explained, negative counting from the end (``None``: -1, the last one).
        modes: ``"attnlrp"`` (LXT's ``attnLRP`` map) and/or ``"cp"`` (``cp_LRP``; GPT-2 and
            Llama only), run in this order.
        timeout: seconds before a child process is killed.

    Returns:
        ``{mode: {"relevance": [N, T] float32 (summed over the hidden axis), "embedding":
        [N, T, D] float32, "target": [N] int64 (resolved), "logit": [N] float32}}``.

    Raises:
        ValueError: on a mode LXT has no map for (BERT ``"cp"``), on ``position`` for BERT,
            or on inputs of the wrong shape.
        RuntimeError: if a child process fails, LXT refuses a patch, or the patched model's
            logits differ from the model's (by more than ``1e-4 max(1, max|logits|)``).
    """
    import torch

    save = isinstance(model, str | os.PathLike)
    if save:
        kind = torch.load(model, map_location="cpu", weights_only=True)["kind"]
    else:
        kind = model.config.model_type
    maps = _spec(kind)[3]
    if not modes or any(m not in maps for m in modes):
        raise ValueError(f"LXT 2.1 modes for {kind} are {sorted(maps)}; got {list(modes)}")
    ids = np.asarray(input_ids, np.int64)
    mask = np.asarray(attention_mask, np.int64)
    n, t = ids.shape if ids.ndim == 2 else (0, 0)
    target = np.asarray(target, np.int64).reshape(-1)
    if ids.ndim != 2 or mask.shape != ids.shape or target.shape != (n,):
        raise ValueError(f"input_ids and attention_mask must be [N, T] and target [N]; got "
                         f"{ids.shape}, {mask.shape}, {target.shape}")
    if kind == "bert" and position is not None:
        raise ValueError("BERT is explained at its pooled [CLS] logits: position must be None")
    pos = np.broadcast_to(np.asarray(-1 if position is None else position, np.int64), (n,))
    pos = np.where(pos < 0, pos + t, pos)
    if np.any((pos < 0) | (pos >= t)):
        raise ValueError(f"position must lie in [-T, T) with T = {t}; got {position}")
    results: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="lxt_text_") as tmp:
        work = Path(tmp)
        model_path = Path(model).resolve() if save else save_text_model(model, work / "model.pt")
        np.savez(work / "inputs.npz", ids=ids, mask=mask, target=target, position=pos)
        for mode in modes:
            results[mode] = run_child(__name__, work, {"model": str(model_path), "mode": mode},
                                      timeout=timeout, label=f"{kind}, {mode}")
    return results


def _child(work: Path) -> None:
    """Child-process entry: patch with one LXT map, build the model, write ``outputs.npz``."""
    import torch
    from lxt.efficient import monkey_patch

    job = json.loads((work / "job.json").read_text())
    with np.load(work / "inputs.npz") as inputs:
        ids, mask, target, pos = (torch.as_tensor(inputs[k])
                                  for k in ("ids", "mask", "target", "position"))
    model = load_text_model(job["model"])
    kind = model.config.model_type
    plain = torch_text_logits(model, ids.numpy(), mask.numpy())
    module_name, _, _, maps, _ = _spec(kind)
    lxt_map = getattr(importlib.import_module(f"lxt.efficient.models.{kind}"), maps[job["mode"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkey_patch(importlib.import_module(module_name), lxt_map)
    refused = [str(w.message) for w in caught if "patch" in str(w.message)]
    if refused:  # LXT skips a class it finds patched already: the rules would be wrong
        raise RuntimeError(f"LXT refused to patch: {refused}")
    model = load_text_model(job["model"])  # built after patching (BERT's classes are replaced)
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    extra = {} if kind == "bert" else {"use_cache": False}
    logits = model(inputs_embeds=emb, attention_mask=mask, **extra).logits
    err = float(np.max(np.abs(logits.detach().numpy() - plain)))
    if not err <= 1e-4 * max(1.0, float(np.max(np.abs(plain)))):
        raise RuntimeError(f"LXT {job['mode']}: patched logits differ from torch's by {err:.3g}")
    if kind != "bert":
        logits = logits[torch.arange(len(pos)), pos]
    target = torch.where(target < 0, logits.argmax(-1), target)
    explained = logits.gather(1, target[:, None])[:, 0]
    explained.sum().backward()
    assert emb.grad is not None
    r = (emb * emb.grad).detach()
    np.savez(work / "outputs.npz", relevance=r.sum(-1).numpy(), embedding=r.numpy(),
             target=target.numpy(), logit=explained.detach().numpy())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lrp_onnx.testing.text_models WORKDIR``: the child of
    :func:`lxt_text_relevances`."""
    child_main(__name__, _child, argv)


if __name__ == "__main__":
    main()
