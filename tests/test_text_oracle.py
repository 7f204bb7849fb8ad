"""The LXT 2.1 oracle for HF text models (:mod:`lrp_onnx.testing.text_models`): seeded random
models, exports that match torch with dynamic ``N`` and ``T``, and LXT relevances checked
against exact conservation, a hand-written CP-LRP Llama and the attention mask."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import ROOT  # noqa: E402
from lrp_onnx.testing import text_models as TM  # noqa: E402

KINDS = ("bert", "gpt2", "llama")


def test_import_does_not_import_torch() -> None:
    code = ("import sys, lrp_onnx, lrp_onnx.testing.text_models; "
            "assert 'torch' not in sys.modules and 'lxt' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_text_model_is_seeded_and_randomises_every_parameter(kind) -> None:
    import torch

    state = torch.random.get_rng_state()
    model = TM.tiny_text_model(kind, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert not model.training and model.config._attn_implementation == "eager"
    assert model.config.use_cache is False
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert torch.count_nonzero(p) == p.numel(), name
    values = [p.detach().flatten()[:8] for p in params.values()]
    assert len({tuple(v.tolist()) for v in values}) == len(values)  # no two initializers alike
    if kind == "llama":  # CP-LRP conservation below needs a bias-free model
        assert not [name for name in params if "bias" in name]
    again = dict(TM.tiny_text_model(kind, seed=1).named_parameters())
    other = dict(TM.tiny_text_model(kind, seed=2).named_parameters())
    for name, p in params.items():
        assert torch.equal(again[name], p) and not torch.equal(other[name], p), name


def test_bert_head_depends_on_the_input() -> None:
    model = TM.tiny_text_model("bert")
    ids, mask = TM.text_batch(16, 10, 100, seed=5)
    logits = TM.torch_text_logits(model, ids, mask)
    assert logits.shape == (16, 2)
    assert np.all(np.ptp(logits, axis=0) > 0.1), np.ptp(logits, axis=0)


def test_overrides_go_into_the_config() -> None:
    from transformers import BertConfig, GPT2Config

    model = TM.tiny_text_model("gpt2", n_layer=1, n_positions=16)
    assert model.config.n_layer == 1 and len(model.transformer.h) == 1
    assert model.transformer.wpe.weight.shape == (16, 32)
    bert = BertConfig(**TM.text_model_sizes["bert-base"])
    assert (bert.hidden_size, bert.num_hidden_layers, bert.vocab_size) == (768, 12, 30522)
    gpt2 = GPT2Config(**TM.text_model_sizes["gpt2-small"])
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.vocab_size) == (768, 12, 50257)
    with pytest.raises(ValueError, match="kind must be one of"):
        TM.tiny_text_model("t5")


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(tmp_path, kind) -> None:
    model = TM.tiny_text_model(kind, seed=3)
    loaded = TM.load_text_model(TM.save_text_model(model, tmp_path / "m.pt"))
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config._attn_implementation == "eager"
    ids, mask = TM.text_batch(2, 6, 100)
    np.testing.assert_array_equal(TM.torch_text_logits(loaded, ids, mask),
                                  TM.torch_text_logits(model, ids, mask))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_matches_torch_with_dynamic_sizes(tmp_path, kind, exporter) -> None:
    pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    import onnx

    model = TM.tiny_text_model(kind, seed=4)
    opset = 17 if exporter == "legacy" else 20
    path = TM.export_text(model, tmp_path / "m.onnx", exporter=exporter, opset=opset)
    assert not model.training  # the exporter restores the wrapper's mode
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # self-contained
    graph = onnx.load(str(path)).graph

    def dims(v) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in graph.input] == [
        ("input_ids", onnx.TensorProto.INT64, ["N", "T"]),
        ("attention_mask", onnx.TensorProto.INT64, ["N", "T"])]
    assert [(v.name, dims(v)) for v in graph.output] == [
        ("logits", ["N", 2] if kind == "bert" else ["N", "T", 100])]
    ids, mask = TM.text_batch(4, 13, 100, seed=9)
    got = TM.ort_text_logits(path, ids, mask)
    np.testing.assert_allclose(got, TM.torch_text_logits(model, ids, mask), atol=1e-4)


def _cp_llama_reference(model, ids: np.ndarray, mask: np.ndarray, position: np.ndarray,
                        target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CP-LRP on an HF Llama in plain torch, written from the paper, not from LXT: the forward
    pass with the RMSNorm scales, the attention probabilities and the SiLU gates held constant
    (detached), then gradient x input at the word embeddings. Returns (R [N, T], logits)."""
    import torch

    cfg = model.config
    n, t = ids.shape
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    padded = torch.as_tensor(mask, dtype=torch.bool)[:, None, None, :]
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool)) & padded  # [N, 1, T, T]

    def norm(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).detach()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    emb = model.model.embed_tokens.weight[torch.as_tensor(ids)].detach().requires_grad_(True)
    h = emb
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        x = norm(h, layer.input_layernorm.weight)
        q = rope(a.q_proj(x).view(n, t, heads, hd).transpose(1, 2))
        k = rope(a.k_proj(x).view(n, t, kv, hd).transpose(1, 2)).repeat_interleave(heads // kv, 1)
        v = a.v_proj(x).view(n, t, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, 1)
        scores = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(~keep, torch.finfo().min)
        probs = torch.softmax(scores, -1).detach()
        h = h + a.o_proj((probs @ v).transpose(1, 2).reshape(n, t, heads * hd))
        x = norm(h, layer.post_attention_layernorm.weight)
        h = h + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)).detach() * mlp.up_proj(x))
    logits = model.lm_head(norm(h, model.model.norm.weight))
    picked = logits[torch.arange(n), torch.as_tensor(position)]
    picked.gather(1, torch.as_tensor(target)[:, None]).sum().backward()
    assert emb.grad is not None
    return (emb * emb.grad).sum(-1).detach().numpy(), logits.detach().numpy()


@pytest.mark.slow
def test_llama_cp_conserves_and_matches_a_hand_written_reference() -> None:
    pytest.importorskip("lxt")
    model = TM.tiny_text_model("llama", seed=5)
    ids, mask = TM.text_batch(3, 7, 100, seed=6)
    ids[1], mask[1] = ids[0], mask[0]  # rows 0 and 1 alike, explained at -1 and T - 1
    mask[2] = [1, 1, 1, 1, 1, 0, 0]
    position = np.array([-1, 6, -3])
    target = np.array([-1, -1, 17])
    logits = TM.torch_text_logits(model, ids, mask)
    # cp runs after attnlrp: it would silently stay AttnLRP if both shared one process
    out = TM.lxt_text_relevances(model, ids, mask, target, position, modes=("attnlrp", "cp"))
    picked = logits[np.arange(3), [6, 6, 4]]
    want_target = np.array([picked[0].argmax(), picked[1].argmax(), 17])
    for mode, res in out.items():
        assert res["relevance"].shape == (3, 7) and res["embedding"].shape == (3, 7, 32), mode
        np.testing.assert_allclose(res["relevance"], res["embedding"].sum(-1), rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_array_equal(res["target"], want_target)
        np.testing.assert_allclose(res["logit"], picked[np.arange(3), want_target], rtol=1e-5)
        np.testing.assert_allclose(res["relevance"][0], res["relevance"][1], rtol=1e-5,
                                   atol=1e-7)  # position -1 is T - 1
        assert np.all(res["relevance"][2, 5:] == 0), mode  # padded tokens, after the position
    cp = out["cp"]
    np.testing.assert_allclose(cp["relevance"].sum(1, dtype=np.float64), cp["logit"], rtol=1e-4)
    ref, ref_logits = _cp_llama_reference(model, ids, mask, np.array([6, 6, 4]), want_target)
    np.testing.assert_allclose(ref_logits, logits, rtol=1e-4, atol=1e-5)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(cp["relevance"], ref, rtol=1e-4, atol=1e-5 * scale)
    assert not np.allclose(out["attnlrp"]["relevance"], ref, atol=1e-2 * scale)


@pytest.mark.parametrize(("kind", "modes"), [
    ("bert", ("attnlrp",)), pytest.param("gpt2", ("attnlrp", "cp"), marks=pytest.mark.slow)])
def test_oracle_explains_the_model_and_ignores_padding(kind, modes) -> None:
    pytest.importorskip("lxt")
    model = TM.tiny_text_model(kind, seed=7)
    ids, mask = TM.text_batch(2, 8, 100, seed=8)  # row 1: last 3 tokens padded
    logits = TM.torch_text_logits(model, ids, mask)
    position = None if kind == "bert" else np.array([-1, 4])
    picked = logits if kind == "bert" else logits[np.arange(2), [7, 4]]
    out = TM.lxt_text_relevances(model, ids, mask, np.array([-1, 1]), position, modes=modes)
    assert list(out) == list(modes)
    for mode, res in out.items():
        np.testing.assert_array_equal(res["target"], [picked[0].argmax(), 1])
        np.testing.assert_allclose(res["logit"], picked[[0, 1], res["target"]], rtol=1e-5)
        assert np.all(np.isfinite(res["embedding"])) and res["relevance"].dtype == np.float32
        assert np.all(res["relevance"][1, 5:] == 0), mode  # attention_mask 0: exactly nothing
        assert np.all(res["relevance"][1, :5] != 0), mode


def test_oracle_refuses_what_lxt_has_no_map_for() -> None:
    model = TM.tiny_text_model("bert")
    ids, mask = TM.text_batch(1, 4, 100)
    with pytest.raises(ValueError, match="modes for bert"):
        TM.lxt_text_relevances(model, ids, mask, np.array([0]), modes=("cp",))
    with pytest.raises(ValueError, match="position must be None"):
        TM.lxt_text_relevances(model, ids, mask, np.array([0]), position=-1)
    with pytest.raises(ValueError, match="position must lie"):
        TM.lxt_text_relevances(TM.tiny_text_model("gpt2"), ids, mask, np.array([0]), position=4)
