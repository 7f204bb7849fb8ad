"""The LXT 2.1 oracle for torchvision Vision Transformers (the transformer tier's reference).

* :func:`tiny_vit` builds a small torchvision ``VisionTransformer`` with every parameter randomised
  (torchvision zero-initialises the head, the class token and the attention biases, so a default
  model has identically zero logits), or with every offset zeroed for conservation tests.
* :func:`export_vit` exports it to one self-contained ONNX file (input ``input``, output
  ``logits``) with the legacy or the dynamo exporter and checks it on ONNX Runtime's CPU EP.
* :func:`lxt_relevance` computes the input relevance with LXT 2.1 (``lxt.efficient``): ``"cp"``
  is LXT's default torchvision map (CP-LRP in attention, identity rule on GELU, LayerNorm's
  sigma detached), ``"attnlrp"`` additionally replaces ``torch.nn.MultiheadAttention.forward``
  by an explicit softmax attention whose gradient is divided by 4 at q and k and by 2 at v
  (LXT's wrapper for HF attention, applied to torchvision: LXT ships no AttnLRP map for it).
  LXT patches classes process-wide, so it always runs in a child process: the model travels as
  ``torch.save({"config", "state_dict"})``, the arrays as ``.npz`` files.

numpy and torch are imported inside the functions: importing this module imports neither torch
nor LXT. LXT 2.1 needs ``transformers`` < 4.55 (``pip install ".[test]"`` pins 4.52.4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Exporter = Literal["legacy", "dynamo"]
Mode = Literal["cp", "attnlrp", "cp_gamma"]
#: The modes :func:`lxt_relevances` runs by default.
MODES: tuple[Mode, ...] = ("cp", "attnlrp")
#: Every mode: ``cp_gamma`` is LXT's Gamma variant for ViTs (CP-LRP plus zennit's Gamma on
#: Conv2d and Linear modules, in gradient x input form through ``monkey_patch_zennit``).
ALL_MODES: tuple[Mode, ...] = ("cp", "attnlrp", "cp_gamma")
GAMMA_CONV, GAMMA_DENSE = 0.25, 0.05

# -- the model ------------------------------------------------------------------------------------
def tiny_vit(seed: int = 0, num_layers: int = 2, num_heads: int = 3, hidden_dim: int = 192,
             mlp_dim: int = 768, num_classes: int = 10, image_size: int = 224,
             patch_size: int = 16, *, zero_offsets: bool = False) -> Any:
    """A small torchvision ``VisionTransformer`` in eval mode with every parameter randomised.

    Weights keep torchvision's (seeded) initialisation, except: LayerNorm gamma
    ``= 1 + 0.1 N(0,1)``; every bias, LayerNorm beta and the class token ``= 0.02 N(0,1)``;
    ``heads.head.*`` ``= 0.05 N(0,1)``. The draws come from a generator seeded with ``seed``;
    the global torch RNG is left as it was.

    Args:
        seed: seed of torchvision's initialisation and of the randomisation.
        num_layers: encoder blocks.
        num_heads: attention heads per block.
        hidden_dim: token width.
        mlp_dim: hidden width of each block's MLP.
        num_classes: logits.
        image_size: input height and width.
        patch_size: patch (and Conv stride) size.
        zero_offsets: also set every bias, LayerNorm beta, the class token and the position
            embedding to zero, so that CP-LRP conserves relevance exactly (pixels = logit).

    Returns:
        The ``torchvision.models.vision_transformer.VisionTransformer``.
    """
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(image_size=image_size, patch_size=patch_size,
                                  num_layers=num_layers, num_heads=num_heads,
                                  hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                  num_classes=num_classes).eval()
    gen = torch.Generator().manual_seed(seed)
    ln_weights = {f"{name}.weight" for name, module in model.named_modules()
                  if isinstance(module, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():  # in registration order: the draws are fixed
            if name.startswith("heads."):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif name in ln_weights:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or name == "class_token":
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            if zero_offsets and (name.endswith("bias") or name in ("class_token",
                                                                   "encoder.pos_embedding")):
                p.zero_()
    return model


def vit_config(model: Any) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (a torchvision ``VisionTransformer``
    with the default LayerNorm and a plain Conv patch embedding)."""
    import torch

    if not isinstance(model.conv_proj, torch.nn.Conv2d):
        raise ValueError("only ViTs with a Conv2d patch embedding (no conv stem) are supported")
    blocks = list(model.encoder.layers)
    return {"image_size": model.image_size, "patch_size": model.patch_size,
            "num_layers": len(blocks), "num_heads": blocks[0].num_heads,
            "hidden_dim": model.hidden_dim, "mlp_dim": model.mlp_dim,
            "num_classes": model.num_classes, "representation_size": model.representation_size}


def save_vit(model: Any, path: str | os.PathLike[str]) -> Path:
    """Save ``{"config": vit_config(model), "state_dict": ...}`` to ``path`` (read by
    :func:`load_vit` and accepted by :func:`lxt_relevance`)."""
    import torch

    path = Path(path)
    torch.save({"config": vit_config(model), "state_dict": model.state_dict()}, path)
    return path


def load_vit(path: str | os.PathLike[str]) -> Any:
    """Rebuild the eval-mode ``VisionTransformer`` saved by :func:`save_vit`."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = VisionTransformer(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


# -- unpatched, in-process diagnostics -----------------------------------------------------------
def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    """The float32 logits ``[N, K]`` of ``model`` on ``x`` (no gradient)."""
    import torch

    with torch.no_grad():
        return np.asarray(model(torch.as_tensor(np.asarray(x, np.float32))).numpy())


def grad_x_input(model: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Plain Gradient x Input (no LXT): ``x * d(sum_i logits[i, target[i]])/dx``."""
    import torch

    xt = torch.tensor(np.asarray(x, np.float32), requires_grad=True)
    logits = model(xt)
    idx = torch.as_tensor(np.asarray(target, np.int64)).reshape(-1, 1)
    logits.gather(1, idx).sum().backward()
    assert xt.grad is not None
    return np.asarray((xt * xt.grad).detach().numpy(), np.float32)


# -- ONNX export ----------------------------------------------------------------------------------
def op_histogram(path: str | os.PathLike[str]) -> dict[str, int]:
    """``op_type -> count`` over the main graph of an ONNX file, most frequent first."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(node.op_type for node in graph.node).most_common())


def inline_external_data(path: Path) -> None:
    """Rewrite ``path`` with every tensor inline if an exporter wrote external data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    tensors = list(onnx.external_data_helper._get_all_tensors(proto))
    files = {entry.value for t in tensors if uses_external_data(t)
             for entry in t.external_data if entry.key == "location"}
    if not files:
        return
    proto = onnx.load(str(path))  # reads the external data
    for t in onnx.external_data_helper._get_all_tensors(proto):
        if uses_external_data(t):  # pragma: no cover - onnx.load already inlined it
            raise RuntimeError(f"tensor {t.name} still external after loading")
    onnx.save(proto, str(path), save_as_external_data=False)
    for name in files:
        (path.parent / name).unlink(missing_ok=True)


def ort_logits(path: str | os.PathLike[str], x: np.ndarray) -> np.ndarray:
    """Run an exported ViT on ONNX Runtime's CPU EP (one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], {"input": np.asarray(x, np.float32)})[0])


def export_vit(model: Any, path: str | os.PathLike[str], *, exporter: Exporter, opset: int,
               batch: int = 1, dynamic_batch: bool = True, atol: float = 1e-4) -> Path:
    """Export a ViT to a single self-contained ONNX file and check it on ONNX Runtime (CPU).

    Args:
        model: an eval-mode torchvision ``VisionTransformer`` (export before any LXT patching:
            a patched model exports with LayerNormalization decomposed).
        path: the ``.onnx`` file to write.
        exporter: ``"legacy"`` (TorchScript, ``dynamic_axes``) or ``"dynamo"``
            (``torch.export``, ``dynamic_shapes`` with ``Dim("N")``).
        opset: ONNX opset (legacy 17; dynamo 18, 20, 23 tested; 23 emits the fused
            ``Attention`` op).
        batch: batch size of the example input (dynamo with a dynamic batch needs >= 2 to
            avoid 0/1 specialisation, so 2 is used when ``batch`` is 1).
        dynamic_batch: make the batch dimension ``N`` symbolic.
        atol: largest allowed ``|logits_ort - logits_torch|`` (scaled by ``max(1, max|logits|)``).

    Returns:
        ``path``, input ``input [N, 3, H, W]``, output ``logits [N, K]``.

    Raises:
        RuntimeError: if ONNX Runtime's logits differ from torch's (at ``batch`` and, for a
            dynamic batch, also at ``batch + 1``).
    """
    import torch

    path = Path(path)
    size = model.image_size
    example_batch = max(batch, 2) if exporter == "dynamo" and dynamic_batch else batch
    example = torch.randn(example_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    names: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter == "legacy":
        axes = {"input": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          dynamic_axes=axes, **names)
    elif exporter == "dynamo":
        shapes = ({0: torch.export.Dim("N")},) if dynamic_batch else None
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                          dynamic_shapes=shapes, external_data=False, verbose=False, **names)
    else:
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
    inline_external_data(path)
    rng = np.random.default_rng(1)
    for n in (batch, batch + 1) if dynamic_batch else (batch,):
        x = rng.standard_normal((n, 3, size, size), dtype=np.float32)
        want = torch_logits(model, x)
        try:
            got = ort_logits(path, x)
        except Exception as exc:
            raise RuntimeError(f"ONNX Runtime cannot run {path.name} ({exporter}, opset "
                               f"{opset}) at batch {n}: {exc}") from exc
        err = float(np.max(np.abs(got - want))) if got.shape == want.shape else np.inf
        if not err <= atol * max(1.0, float(np.max(np.abs(want)))):
            raise RuntimeError(f"{path.name} ({exporter}, opset {opset}): ONNX Runtime logits "
                               f"differ from torch at batch {n}: max|diff| = {err:.3g}")
    return path


# -- the LXT oracle (child process) ---------------------------------------------------------------
def lxt_relevance(model: Any, x: np.ndarray, target: np.ndarray, mode: Mode = "cp", *,
                  timeout: float = 900) -> np.ndarray:
    """Input relevance of LXT 2.1 on a torchvision ViT, computed in a child process.

    ``R = x * dL/dx`` with ``L = sum_i logits[i, target[i]]`` on the LXT-patched model, so the
    relevance put on each explained logit is the logit itself.

    Args:
        model: a ``VisionTransformer``, or the path of a file written by :func:`save_vit`.
        x: float32 images ``[N, 3, H, W]``.
        target: class per sample, ``[N]`` integers.
        mode: ``"cp"`` (LXT's default torchvision map, CP-LRP), ``"attnlrp"`` (that map
            plus the AttnLRP MultiheadAttention forward) or ``"cp_gamma"`` (CP-LRP with
            zennit's Gamma on convolutions and linears, :data:`GAMMA_CONV`, :data:`GAMMA_DENSE`).
        timeout: seconds before the child process is killed.

    Returns:
        float32 relevance with the shape of ``x``.
    """
    return lxt_relevances(model, x, target, (mode,), timeout=timeout)[mode]


def lxt_relevances(model: Any, x: np.ndarray, target: np.ndarray,
                   modes: Sequence[Mode] = MODES, *, timeout: float = 900) -> dict[str, np.ndarray]:
    """:func:`lxt_relevance` for several modes in one child process (LXT's import costs
    seconds; ``"cp"`` runs before ``"attnlrp"``, which patches on top of it)."""
    unknown = set(modes) - set(ALL_MODES)
    if unknown or not modes:
        raise ValueError(f"modes must be among {ALL_MODES}, got {list(modes)}")
    x = np.asarray(x, np.float32)
    target = np.asarray(target, np.int64).reshape(-1)
    if x.ndim != 4 or target.shape != (x.shape[0],):
        raise ValueError(f"x must be [N, 3, H, W] and target [N]; got {x.shape}, {target.shape}")
    with tempfile.TemporaryDirectory(prefix="lxt_oracle_") as tmp:
        work = Path(tmp)
        if isinstance(model, str | os.PathLike):
            model_path = Path(model).resolve()
        else:
            model_path = save_vit(model, work / "model.pt")
        np.savez(work / "inputs.npz", x=x, target=target)
        ordered = [m for m in ALL_MODES if m in modes]
        out = run_child(__name__, work, {"model": str(model_path), "modes": ordered},
                        timeout=timeout)
        return {m: np.asarray(out[m], np.float32) for m in ordered}


def _attnlrp_mha_forward(self: Any, query: Any, key: Any, value: Any,
                         key_padding_mask: Any = None, need_weights: bool = True,
                         attn_mask: Any = None, average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[Any, None]:
    """AttnLRP ``MultiheadAttention.forward`` for torchvision's batch-first self-attention:
    explicit softmax attention, gradient divided by 4 at q and k and by 2 at v (uniform rule
    with epsilon on the two MatMuls in LXT's Gradient x Input form)."""
    import torch
    import torch.nn.functional as F
    from lxt.efficient.rules import divide_gradient

    if not (query is key and key is value and self.batch_first and self._qkv_same_embed_dim):
        raise NotImplementedError("AttnLRP patch: batch-first self-attention with packed qkv only")
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise NotImplementedError("AttnLRP patch: masks are not supported")
    B, L, E = query.shape
    H = self.num_heads
    hd = E // H
    qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, L, H, hd).transpose(1, 2) for t in qkv)
    q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    attn = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, L, E)
    return F.linear(out, self.out_proj.weight, self.out_proj.bias), None


def _relevance(model: Any, x: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(x * grad, logits)`` of the (patched) model."""
    xt = x.clone().requires_grad_(True)
    logits = model(xt)
    logits.gather(1, target.reshape(-1, 1)).sum().backward()
    assert xt.grad is not None
    return (xt * xt.grad).detach().numpy(), logits.detach().numpy()


def _child(work: Path) -> None:
    """Child-process entry: patch with LXT, write ``outputs.npz`` (one array per mode)."""
    import torch
    import torchvision
    from lxt.efficient import monkey_patch

    job = json.loads((work / "job.json").read_text())
    model = load_vit(job["model"])
    with np.load(work / "inputs.npz") as inputs:
        x = torch.as_tensor(inputs["x"])
        target = torch.as_tensor(inputs["target"])
    with torch.no_grad():
        plain = model(x).numpy()
    monkey_patch(torchvision.models.vision_transformer)
    cp_forward = torch.nn.MultiheadAttention.forward
    out: dict[str, Any] = {}
    for mode in job["modes"]:
        mha = _attnlrp_mha_forward if mode == "attnlrp" else cp_forward
        torch.nn.MultiheadAttention.forward = mha  # type: ignore[method-assign]
        if mode == "cp_gamma":  # LXT's Gamma variant: zennit rules in gradient x input form
            import zennit.rules as zr
            from lxt.efficient import monkey_patch_zennit
            from zennit.composites import LayerMapComposite

            monkey_patch_zennit()
            gamma = LayerMapComposite([(torch.nn.Conv2d, zr.Gamma(GAMMA_CONV)),
                                       (torch.nn.Linear, zr.Gamma(GAMMA_DENSE))])
            with gamma.context(model):
                out[mode], logits = _relevance(model, x, target)
        else:
            out[mode], logits = _relevance(model, x, target)
        err = float(np.max(np.abs(logits - plain)))
        if not err <= 1e-4 * max(1.0, float(np.max(np.abs(plain)))):
            raise RuntimeError(f"LXT {mode}: patched logits differ from torch's by {err:.3g}")
    np.savez(work / "outputs.npz", **out)


def run_child(module: str, work: Path, job: dict[str, Any], *, timeout: float,
              label: str = "") -> dict[str, np.ndarray]:
    """Run an oracle's child, ``python -m MODULE WORK`` (see :func:`child_main`), and read its
    results back.

    ``job`` is written to ``WORK/job.json``; the caller has put the input arrays in ``WORK``
    (``.npz`` files) and the child writes ``WORK/outputs.npz``. The child runs in ``WORK`` with
    this checkout first on ``PYTHONPATH``, so it imports the same ``lrp_onnx``.

    Args:
        module: the oracle module whose ``main`` is the child (its ``__name__``).
        work: the work folder the parent and the child share.
        job: JSON-serialisable parameters of the child.
        timeout: seconds before the child process is killed.
        label: what the error message names besides "LXT child process", e.g. ``"gpt2, cp"``.

    Returns:
        every array of ``outputs.npz``, by name.

    Raises:
        RuntimeError: if the child exits non-zero; the message ends with its stderr's tail.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    (work / "job.json").write_text(json.dumps(job))
    (work / "outputs.npz").unlink(missing_ok=True)  # never read a previous child's results
    proc = subprocess.run([sys.executable, "-m", module, str(work)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        what = f" ({label})" if label else ""
        raise RuntimeError(f"LXT child process{what} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    with np.load(work / "outputs.npz") as out:
        return {k: np.asarray(out[k]) for k in out.files}


def child_main(module: str, child: Callable[[Path], None],
               argv: Sequence[str] | None = None) -> None:
    """``python -m MODULE WORKDIR``: run an oracle's ``child`` on its work folder."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {module} WORKDIR")
    child(Path(args[0]))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lrp_onnx.testing.transformers WORKDIR``: the child of :func:`lxt_relevances`."""
    child_main(__name__, _child, argv)


if __name__ == "__main__":
    main()
