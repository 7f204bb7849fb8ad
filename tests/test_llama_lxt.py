"""A tiny Llama causal LM (both torch exporters) compiled with ``AttnLRP()`` and ``CPLRP()``
against LXT 2.1.

The model is ``LlamaForCausalLM`` as in docs/notes/text-models-survey.md (hidden 32, 2 layers,
4 heads, 2 KV heads, intermediate 64, vocab 100, eager attention), every parameter random
(N(0, 0.2); norm weights 1 + 0.1 N(0, 1)). Until token-id inputs are supported it is exported
with a float input: ``forward(inputs_embeds, attention_mask) -> logits[:, -1]``, legacy at
opset 17 (``dynamic_axes``) and dynamo at opset 20 (``dynamic_shapes``), N and T dynamic.

Checked per export and composite, on a batch of 3 with sample 1 right-padded: the token
relevance (summed over the hidden axis) equals LXT's ``(emb * emb.grad).sum(-1)`` (its
``attnLRP`` / ``cp_LRP`` patches of ``modeling_llama``, run in a subprocess because they patch
process-wide) to rel-L2 ≤ 1e-4 and correlation ≥ 0.9999 per sample; the seed is the logit
(``normalize_output_relevance=False``), as LXT's gradient × input gives it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lxt")
pytest.importorskip("onnxscript")

from lrp_onnx import CPLRP, LRP, AttnLRP  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=100, max_position_embeddings=64)
COMPOSITES = {"AttnLRP": AttnLRP, "CPLRP": CPLRP}
MODES = {"AttnLRP": "attnLRP", "CPLRP": "cp_LRP"}
EXPORTS = [("legacy", 17), ("dynamo", 20)]

#: LXT in a child process: argv = mode, state dict, inputs (.npz with x, mask, target), output.
LXT_CHILD = """
import sys, numpy as np, torch
from lxt.efficient import monkey_patch
from lxt.efficient.models import llama as lxt_llama
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama
mode, state, inputs, out, config = sys.argv[1:6]
monkey_patch(modeling_llama, getattr(lxt_llama, mode))
cfg = LlamaConfig(**eval(config))
cfg._attn_implementation = "eager"
model = modeling_llama.LlamaForCausalLM(cfg).eval()
model.load_state_dict(torch.load(state))
for p in model.parameters():
    p.requires_grad_(False)
d = np.load(inputs)
emb = torch.tensor(d["x"]).requires_grad_(True)
logits = model(inputs_embeds=emb, attention_mask=torch.tensor(d["mask"]),
               use_cache=False).logits[:, -1]
logits.gather(1, torch.tensor(d["target"])[:, None]).sum().backward()
np.save(out, (emb * emb.grad).sum(-1).detach().double().numpy())
"""


def build_llama() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**CONFIG)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


def export(model: Any, path: Path, exporter: str, opset: int) -> None:
    import torch

    class LastLogits(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, inputs_embeds: Any, attention_mask: Any) -> Any:
            return self.m(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          use_cache=False).logits[:, -1]

    wrapper = LastLogits(model).eval()
    emb = torch.randn(2, 8, CONFIG["hidden_size"])
    mask = torch.ones(2, 8, dtype=torch.int64)
    names = dict(input_names=["inputs_embeds", "attention_mask"], output_names=["logits"])
    if exporter == "legacy":
        torch.onnx.export(wrapper, (emb, mask), str(path), dynamo=False, opset_version=opset,
                          dynamic_axes={"inputs_embeds": {0: "N", 1: "T"},
                                        "attention_mask": {0: "N", 1: "T"}, "logits": {0: "N"}},
                          **names)
    else:
        from torch.export import Dim

        n, t = Dim("N"), Dim("T", max=64)
        torch.onnx.export(wrapper, (emb, mask), str(path), dynamo=True, opset_version=opset,
                          dynamic_shapes={"inputs_embeds": {0: n, 1: t},
                                          "attention_mask": {0: n, 1: t}}, **names)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    work = tmp_path_factory.mktemp("llama")
    model = build_llama()
    torch.save(model.state_dict(), work / "state.pt")
    paths = {}
    for exporter, opset in EXPORTS:
        paths[exporter] = work / f"{exporter}{opset}.onnx"
        export(model, paths[exporter], exporter, opset)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 8, CONFIG["hidden_size"])).astype(np.float32)
    mask = np.ones((3, 8), np.int64)
    mask[1, 5:] = 0  # sample 1 right-padded
    with torch.no_grad():
        logits = model(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask),
                       use_cache=False).logits[:, -1].numpy()
    target = logits.argmax(-1)
    np.savez(work / "inputs.npz", x=x, mask=mask, target=target)
    refs = {}
    for name, mode in MODES.items():
        out = work / f"lxt_{mode}.npy"
        subprocess.run([sys.executable, "-c", LXT_CHILD, mode, str(work / "state.pt"),
                        str(work / "inputs.npz"), str(out), repr(CONFIG)], check=True,
                       capture_output=True)
        refs[name] = np.load(out)
    return {"paths": paths, "x": x, "mask": mask, "target": target, "logits": logits,
            "refs": refs}


@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("exporter", [e for e, _ in EXPORTS])
def test_llama_equals_lxt(llama: dict[str, Any], exporter: str, composite: str) -> None:
    lrp = LRP(llama["paths"][exporter], COMPOSITES[composite](), input="inputs_embeds",
              normalize_output_relevance=False)
    assert sum(la.kind == "RMSNorm" for la in lrp.layers) == 5
    ex = lrp.analyze(llama["x"], llama["target"], inputs={"attention_mask": llama["mask"]})
    np.testing.assert_allclose(ex.output, llama["logits"], rtol=0, atol=1e-5)
    got = ex.relevance.astype(np.float64).sum(-1)
    want = llama["refs"][composite]
    for i in range(len(got)):
        rel = np.linalg.norm(got[i] - want[i]) / np.linalg.norm(want[i])
        corr = np.corrcoef(got[i], want[i])[0, 1]
        assert rel <= 1e-4 and corr >= 0.9999, (i, rel, corr)
    if composite == "CPLRP":  # no biases: CP-LRP conserves the logit exactly
        picked = llama["logits"][np.arange(len(got)), llama["target"]]
        np.testing.assert_allclose(got.sum(1), picked, rtol=1e-5)
