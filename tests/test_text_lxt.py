"""BERT, GPT-2 and Llama compiled from their token ids with ``AttnLRP()`` and ``CPLRP()``,
against LXT 2.1.

Three tiny random-weight HF models (:func:`lrp_onnx.testing.text_models.tiny_text_model`), each
exported by the legacy (opset 17) and the dynamo (opset 20) exporter. One batch of 2 sequences
of 11 tokens (the exports were traced at 8), the second with its last 3 tokens padded; the
language models are explained at each sequence's last real token, BERT at its class logits.
Checked per export and composite:

* the per-token relevance equals LXT's ``(emb * emb.grad).sum(-1)`` per sample (relative L2
  <= 1e-4, correlation >= 0.9999), also on the tokens other than the most relevant one (a
  classifier puts much of its relevance on [CLS]); padded tokens get none;
* the compiled model's logits are the original model's; Llama under CP-LRP (no biases)
  conserves: the tokens' relevance sums to the explained logit;
* the batch equals its samples explained one at a time, unpadded;
* every compiled graph stays inside ONNX Runtime's CUDA kernels (``cuda_gaps``).

The relevance is seeded with the logit (``normalize_output_relevance=False``): LXT seeds the
gradient with 1, so its ``x * grad`` sums towards the logit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

from cuda_kernels import cuda_gaps  # noqa: E402
from lrp_onnx import CPLRP, LRP, AttnLRP  # noqa: E402
from lrp_onnx.testing import text_models as TM  # noqa: E402
from lrp_onnx.testing.oracle import assert_agreement  # noqa: E402

KINDS = {"bert": ("AttnLRP",), "gpt2": ("AttnLRP", "CPLRP"), "llama": ("AttnLRP", "CPLRP")}
EXPORTS = [("legacy", 17), ("dynamo", 20)]
COMPOSITES = {"CPLRP": CPLRP, "AttnLRP": AttnLRP}
MODES = {"CPLRP": "cp", "AttnLRP": "attnlrp"}
N, LENGTH = 2, 11
CASES = [pytest.param(kind, exporter, opset, comp, id=f"{kind}-{exporter}{opset}-{comp}")
         for kind, comps in KINDS.items() for exporter, opset in EXPORTS for comp in comps]


def _positions(kind: str, mask: np.ndarray) -> np.ndarray | None:
    """LMs: each sequence's last real token; BERT: none."""
    return None if kind == "bert" else mask.sum(1) - 1


class Zoo:
    """The models, their exports and LXT's relevances, each made on first use."""

    def __init__(self, folder: Path, batch: tuple[np.ndarray, np.ndarray]) -> None:
        self.folder, self.batch = folder, batch
        self.models: dict[str, Any] = {}
        self.saved: dict[str, Path] = {}
        self.paths: dict[tuple[str, str], Path] = {}
        self.refs: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def model(self, kind: str) -> Any:
        if kind not in self.models:
            self.models[kind] = TM.tiny_text_model(kind, seed=1)
            self.saved[kind] = TM.save_text_model(self.models[kind], self.folder / f"{kind}.pt")
        return self.models[kind]

    def export(self, kind: str, exporter: str, opset: int) -> Path:
        if (kind, exporter) not in self.paths:
            self.paths[(kind, exporter)] = TM.export_text(
                self.model(kind), self.folder / f"{kind}_{exporter}.onnx", exporter=exporter,
                opset=opset)
        return self.paths[(kind, exporter)]

    def reference(self, kind: str, mode: str) -> dict[str, np.ndarray]:
        if (kind, mode) not in self.refs:
            self.model(kind)
            ids, mask = self.batch
            self.refs[(kind, mode)] = TM.lxt_text_relevances(
                self.saved[kind], ids, mask, np.full(N, -1), _positions(kind, mask),
                (mode,))[mode]
        return self.refs[(kind, mode)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("text_lxt"), TM.text_batch(N, LENGTH, 100, seed=5))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "exporter", "opset", "composite"), CASES)
def test_text_model_equals_lxt(kind: str, exporter: str, opset: int, composite: str,
                               zoo: Zoo) -> None:
    ref = zoo.reference(kind, MODES[composite])
    path = zoo.export(kind, exporter, opset)
    ids, mask = zoo.batch
    position = _positions(kind, mask)
    lrp = LRP(path, COMPOSITES[composite](), normalize_output_relevance=False)
    assert lrp.input_name == "input_ids"
    expl = lrp.analyze(ids, inputs={"attention_mask": mask}, position=position,
                       device="cpu")
    label = f"{kind} {exporter}{opset} {composite}"
    np.testing.assert_array_equal(expl.target, ref["target"])
    np.testing.assert_allclose(expl.output, TM.torch_text_logits(zoo.model(kind), ids, mask),
                               atol=1e-4)
    assert_agreement(expl.relevance, ref["relevance"], label)
    # the tokens other than the dominant one (by the reference's |R|)
    top = np.abs(ref["relevance"]).argmax(1)
    keep = np.ones_like(mask, dtype=bool)
    keep[np.arange(N), top] = False
    rest = [r[k] for r, k in zip(expl.relevance, keep)]
    ref_rest = [r[k] for r, k in zip(ref["relevance"], keep)]
    assert_agreement(np.stack(rest), np.stack(ref_rest), f"{label} without the top token")
    assert np.all(expl.relevance[mask == 0] == 0)
    if kind == "llama" and composite == "CPLRP":  # no biases, no softmax rule: conserved
        scores = expl.output[np.arange(N), position]
        logit = scores[np.arange(N), expl.target]
        np.testing.assert_allclose(expl.relevance.sum(1), logit, rtol=1e-5)
    # one sample at a time, without padding, gives the same relevance
    for i in range(N):
        real = int(mask[i].sum())
        one = lrp.analyze(ids[i:i + 1, :real], inputs={"attention_mask": mask[i:i + 1, :real]},
                          position=None if position is None else [real - 1], device="cpu")
        np.testing.assert_allclose(one.relevance[0], expl.relevance[i, :real], rtol=1e-4,
                                   atol=1e-5 * np.abs(expl.relevance[i]).max())
    assert not cuda_gaps(lrp.model), cuda_gaps(lrp.model)[:5]
