"""PyTorch models, ONNX export and Zennit runs shared by the tests and scripts (needs torch).

Nothing here is imported by the compiler; ``pip install lrp-onnx[test]`` brings what it needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def seed_vgg(seed: int = 0) -> Any:
    """The seed page's VGG-like model: two nested chains, 32x32x3 input, 580,396 parameters.

    Flux's ``Conv(..., relu)`` is a Conv2d followed by a ReLU module here; the compiler folds the
    ReLU back into the Conv layer, so the layer view matches the seed page.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        ),
        nn.Sequential(
            nn.Flatten(), nn.Linear(1024, 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, 100), nn.ReLU(),
        ),
    ).eval()


def export(model: Any, path: str | os.PathLike[str], example: Any, *, dynamo: bool = False,
           opset: int | None = None) -> Path:
    """Export ``model`` with a dynamic batch dimension (legacy exporter at opset 17 by default,
    dynamo at its default opset 20), input ``input`` and output ``logits``."""
    import torch

    path = Path(path)
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("N", min=1, max=1024)},)
        if opset is not None:
            kwargs["opset_version"] = opset
        torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, **kwargs)
    else:
        kwargs["dynamic_axes"] = {"input": {0: "N"}, "logits": {0: "N"}}
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          opset_version=opset or 17, **kwargs)
    return path


def insert_dropout(path: str | os.PathLike[str], after: str, ratio: float = 0.5,
                   name: str | None = None) -> None:
    """Insert an inference-mode ``Dropout(ratio)`` after node ``after`` (torch's eval export drops
    Dropout; Flux models and other exporters keep it as a layer)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    pos = next(i for i, n in enumerate(graph.node) if n.name == after)
    src = graph.node[pos].output[0]
    new = f"{src}_dropout"
    for node in graph.node[pos + 1:]:
        for i, inp in enumerate(node.input):
            if inp == src:
                node.input[i] = new
    for out in graph.output:
        if out.name == src:
            raise ValueError("cannot insert Dropout before a graph output")
    ratio_name = f"{name or after}_ratio"
    graph.initializer.append(numpy_helper.from_array(np.array(ratio, dtype=np.float32),
                                                     ratio_name))
    node = helper.make_node("Dropout", [src, ratio_name], [new], name=name or f"{after}_Dropout")
    graph.node.insert(pos + 1, node)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def zennit_relevance(model: Any, x: np.ndarray, composite: Any, target: np.ndarray,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(output, relevance)`` from Zennit with one-hot (value 1) output relevance at ``target``."""
    import torch
    from zennit.attribution import Gradient

    xt = torch.from_numpy(np.ascontiguousarray(x))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(target).long(), num_classes)
    with Gradient(model=model, composite=composite) as attributor:
        out, rel = attributor(xt, onehot.to(xt.dtype))
    return out.detach().numpy(), rel.detach().numpy()


def agreement(ours: np.ndarray, ref: np.ndarray) -> list[tuple[float, float]]:
    """Per sample ``(relative L2 error, correlation)`` of ``ours`` against ``ref``."""
    out = []
    for a, r in zip(ours.reshape(len(ours), -1).astype(np.float64),
                    ref.reshape(len(ref), -1).astype(np.float64)):
        rel = float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))
        corr = float(np.corrcoef(a, r)[0, 1])
        out.append((rel, corr))
    return out


def randomize_batchnorm(model: Any, seed: int = 0) -> Any:
    """Give every BatchNorm non-trivial running statistics and affine parameters (eval mode)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


Builder = Callable[[], Any]
