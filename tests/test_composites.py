"""Rule assignment: every primitive, overwrite order, ranges, first/last, nesting, errors.

Expected assignments are written inline as golden tables (layer position -> rule repr).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lrp_onnx as L
from conftest import MODELS

SEED = MODELS / "seed_vgg.onnx"


def flat_rules(model, composite) -> list[str]:
    return [repr(r) for r in L.lrp_rules(L.flatten_model(model), composite)]


def nested_rules(model, composite) -> list[str]:
    return [repr(r) for r in L.lrp_rules(model, composite).leaves()]


# -- the seed model (nested: two chains of 6 and 4 layers) --------------------------------------
def test_seed_indices_and_tuple_behaviour() -> None:
    idx = L.show_layer_indices(SEED)
    assert isinstance(idx, L.ChainTuple) and len(idx) == 2
    assert idx == L.ChainTuple(L.ChainTuple(*[(1, i) for i in range(1, 7)]),
                               L.ChainTuple(*[(2, i) for i in range(1, 5)]))
    assert idx[0][4] == (1, 5)
    assert list(idx[1]) == [(2, 1), (2, 2), (2, 3), (2, 4)]
    assert L.ChainTuple(1, 2) != L.ParallelTuple(1, 2) and L.ChainTuple(1, 2) == L.ChainTuple(1, 2)
    assert L.flatten_model(SEED)[4].summary == "Conv((3, 3), 16 => 16, relu, pad=1)"


def test_layer_map_nested_index_and_prefix() -> None:
    got = nested_rules(SEED, L.Composite(L.LayerMap((1, 5), L.EpsilonRule())))
    assert got == ["ZeroRule()"] * 4 + ["EpsilonRule(epsilon=1e-06)"] + ["ZeroRule()"] * 5
    got = nested_rules(SEED, L.Composite(L.LayerMap(2, L.PassRule())))
    assert got == ["ZeroRule()"] * 6 + ["PassRule()"] * 4


def test_first_last_maps_on_nested_model() -> None:
    got = nested_rules(SEED, L.Composite(L.GlobalMap(L.EpsilonRule()),
                                         L.FirstLayerMap(L.FlatRule()),
                                         L.LastLayerMap(L.ZPlusRule())))
    assert got[0] == "FlatRule()" and got[-1] == "ZPlusRule()"
    assert got[1:-1] == ["EpsilonRule(epsilon=1e-06)"] * 8


def test_type_maps_first_match_wins_and_groups() -> None:
    comp = L.Composite(L.GlobalTypeMap({"Dense": L.EpsilonRule(0.1), L.DenseLayer: L.ZPlusRule(),
                                        L.PoolingLayer: L.EpsilonRule(), "Flatten": L.PassRule(),
                                        L.DropoutLayer: L.PassRule()}))
    got = nested_rules(SEED, comp)
    assert got == ["ZeroRule()", "ZeroRule()", "EpsilonRule(epsilon=1e-06)", "ZeroRule()",
                   "ZeroRule()", "EpsilonRule(epsilon=1e-06)", "PassRule()",
                   "EpsilonRule(epsilon=0.1)", "PassRule()", "EpsilonRule(epsilon=0.1)"]


def test_first_n_and_range_maps_use_top_level_positions() -> None:
    # On the nested seed model there are two top-level positions; the flattened one has ten.
    assert nested_rules(SEED, L.Composite(L.FirstNTypeMap(1, {"Conv": L.FlatRule()}))) == \
        ["FlatRule()", "FlatRule()", "ZeroRule()", "FlatRule()", "FlatRule()"] + \
        ["ZeroRule()"] * 5
    assert flat_rules(SEED, L.Composite(L.FirstNTypeMap(3, {"Conv": L.FlatRule()}))) == \
        ["FlatRule()", "FlatRule()"] + ["ZeroRule()"] * 8
    assert flat_rules(SEED, L.Composite(L.RangeMap(range(3, 5), L.PassRule()))) == \
        ["ZeroRule()"] * 2 + ["PassRule()"] * 2 + ["ZeroRule()"] * 6
    assert flat_rules(SEED, L.Composite(L.RangeTypeMap(range(4, 11), {"MaxPool": L.PassRule()}))) \
        == ["ZeroRule()"] * 5 + ["PassRule()"] + ["ZeroRule()"] * 4


def test_name_map_globs_onnx_node_names() -> None:
    got = nested_rules(SEED, L.Composite(L.NameMap("/1/*Gemm", L.EpsilonRule(0.5))))
    assert got == ["ZeroRule()"] * 7 + ["EpsilonRule(epsilon=0.5)", "ZeroRule()",
                                         "EpsilonRule(epsilon=0.5)"]


def test_later_primitives_overwrite_earlier_ones() -> None:
    a = L.Composite(L.GlobalMap(L.PassRule()), L.GlobalMap(L.EpsilonRule()))
    b = L.Composite(L.GlobalMap(L.EpsilonRule()), L.GlobalMap(L.PassRule()))
    assert set(nested_rules(SEED, a)) == {"EpsilonRule(epsilon=1e-06)"}
    assert set(nested_rules(SEED, b)) == {"PassRule()"}
    # a type map with no matching key falls through to earlier primitives
    c = L.Composite(L.GlobalMap(L.PassRule()), L.GlobalTypeMap({"Softmax": L.ZeroRule()}))
    assert set(nested_rules(SEED, c)) == {"PassRule()"}


def test_unmatched_layers_get_zero_rule() -> None:
    assert set(nested_rules(SEED, L.Composite())) == {"ZeroRule()"}


def test_rule_count_mismatch() -> None:
    with pytest.raises(L.RuleAssignmentError, match="expected 10 rules .* got 9"):
        L.LRP(SEED, [L.ZeroRule()] * 9)


def test_nested_structure_mismatch() -> None:
    rules = L.ChainTuple(L.ChainTuple(*[L.ZeroRule()] * 6), L.ChainTuple(*[L.ZeroRule()] * 3))
    with pytest.raises(L.RuleAssignmentError, match=r"at \[2\]: ChainTuple has 3 entries"):
        L.LRP(SEED, rules, flatten=False)
    with pytest.raises(L.RuleAssignmentError, match="expected a ChainTuple"):
        L.LRP(SEED, L.ChainTuple(L.ParallelTuple(*[L.ZeroRule()] * 6),
                                 L.ChainTuple(*[L.ZeroRule()] * 4)), flatten=False)


def test_incompatible_rule_error_names_node_rule_and_fits() -> None:
    with pytest.raises(L.RuleNotApplicable) as err:
        L.LRP(SEED, L.Composite(L.LayerMap((1, 3), L.FlatRule())))
    msg = str(err.value)
    assert "FlatRule()" in msg and "MaxPool((2, 2))" in msg and "'/0/0.4/MaxPool'" in msg
    assert "rules that fit: ZeroRule, EpsilonRule" in msg


def test_preset_keyword_arguments() -> None:
    got = nested_rules(SEED, L.EpsilonGammaBox(-2.0, 2.0, epsilon=1e-3, gamma=0.5))
    assert got[0] == "ZBoxRule(low=-2.0, high=2.0)" and got[1] == "GammaRule(gamma=0.5)"
    assert got[7] == "EpsilonRule(epsilon=0.001)"
    assert nested_rules(SEED, L.EpsilonAlpha2Beta1Flat())[:2] == \
        ["FlatRule()", "AlphaBetaRule(alpha=2.0, beta=1.0)"]
    assert nested_rules(SEED, L.EpsilonPlus())[0] == "ZPlusRule()"


def test_parse_composite_is_safe() -> None:
    assert L.parse_composite("EpsilonGammaBox(low=-3.0, high=3.0)") == L.EpsilonGammaBox(-3.0, 3.0)
    assert L.parse_composite(" EpsilonPlusFlat ") == L.EpsilonPlusFlat()
    for bad in ("EpsilonPlusFlat(epsilon=open('x'))", "__import__('os').system('x')", "1 +"):
        with pytest.raises(L.RuleAssignmentError):
            L.parse_composite(bad)


def test_rule_file(tmp_path: Path) -> None:
    from lrp_onnx.rules.rulefile import load_rules

    toml = tmp_path / "r.toml"
    toml.write_text(
        'preset = "EpsilonPlusFlat(epsilon=0.01)"\n'
        '[[map]]\ntype = "LayerMap"\nindex = [1, 5]\nrule = "EpsilonRule(epsilon=0.25)"\n'
        '[[map]]\ntype = "RangeTypeMap"\nrange = [2, 2]\nrules = { Dense = "ZPlusRule" }\n')
    got = nested_rules(SEED, load_rules(toml))
    assert got == ["FlatRule()", "ZPlusRule()", "ZeroRule()", "ZPlusRule()",
                   "EpsilonRule(epsilon=0.25)", "ZeroRule()", "PassRule()", "ZPlusRule()",
                   "PassRule()", "ZPlusRule()"]
    js = tmp_path / "r.json"
    js.write_text('{"map": [{"type": "GlobalMap", "rule": "EpsilonRule(1e-3)"}]}')
    assert set(nested_rules(SEED, load_rules(js))) == {"EpsilonRule(epsilon=0.001)"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[map]]\ntype = "Nope"\n')
    with pytest.raises(L.RuleAssignmentError, match="unknown primitive type 'Nope'"):
        load_rules(bad)


# -- RelevancePropagation.jl's worked example on a flat 19-layer VGG11 (test_composite.jl) --------
@pytest.fixture(scope="module")
def flat_vgg11(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from torch import nn

    from lrp_onnx.testing.oracle import export, insert_dropout

    torch.manual_seed(0)
    c = [3, 4, 8, 8, 8, 8, 8, 8, 8]

    def conv(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]

    layers = (conv(c[0], c[1]) + [nn.MaxPool2d(2)] + conv(c[1], c[2]) + [nn.MaxPool2d(2)]
              + conv(c[2], c[3]) + conv(c[3], c[4]) + [nn.MaxPool2d(2)] + conv(c[4], c[5])
              + conv(c[5], c[6]) + [nn.MaxPool2d(2)] + conv(c[6], c[7]) + conv(c[7], c[8])
              + [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16),
                 nn.ReLU(), nn.Linear(16, 10)])
    model = nn.Sequential(*layers).eval()
    path = export(model, tmp_path_factory.mktemp("vgg11") / "vgg11_flat.onnx",
                  torch.zeros(1, 3, 32, 32))
    insert_dropout(path, after="/23/Relu", name="/d1/Dropout")
    insert_dropout(path, after="/25/Relu", name="/d2/Dropout")
    return path


def test_relevancepropagation_jl_worked_example(flat_vgg11: Path) -> None:
    composite = L.Composite(
        L.ZeroRule(),
        L.GlobalMap(L.PassRule()),
        L.GlobalTypeMap({L.ConvLayer: L.AlphaBetaRule(2, 1), "Dense": L.EpsilonRule(1e-6),
                         L.PoolingLayer: L.EpsilonRule(1e-6)}),
        L.FirstNTypeMap(7, {"Conv": L.FlatRule()}),
        L.RangeTypeMap(range(4, 11), {L.PoolingLayer: L.EpsilonRule(1e-5)}),
        L.LayerMap(9, L.AlphaBetaRule(1, 0)),
        L.FirstLayerMap(L.ZBoxRule(-3, 3)),
        L.RangeMap(range(18, 20), L.ZeroRule()),
        L.LastLayerMap(L.PassRule()),
    )
    expected = {
        1: "ZBoxRule(low=-3.0, high=3.0)", 2: "EpsilonRule(epsilon=1e-06)", 3: "FlatRule()",
        4: "EpsilonRule(epsilon=1e-05)", 5: "FlatRule()", 6: "FlatRule()",
        7: "EpsilonRule(epsilon=1e-05)", 8: "AlphaBetaRule(alpha=2.0, beta=1.0)",
        9: "AlphaBetaRule(alpha=1.0, beta=0.0)", 10: "EpsilonRule(epsilon=1e-05)",
        11: "AlphaBetaRule(alpha=2.0, beta=1.0)", 12: "AlphaBetaRule(alpha=2.0, beta=1.0)",
        13: "EpsilonRule(epsilon=1e-06)", 14: "PassRule()", 15: "EpsilonRule(epsilon=1e-06)",
        16: "PassRule()", 17: "EpsilonRule(epsilon=1e-06)", 18: "ZeroRule()", 19: "PassRule()",
    }
    got = nested_rules(flat_vgg11, composite)
    assert len(got) == 19
    assert {i + 1: r for i, r in enumerate(got)} == expected
    printed = repr(composite).splitlines()
    assert printed[:4] == ["Composite(", "  GlobalMap(ZeroRule()),  # all layers",
                           "  GlobalMap(PassRule()),  # all layers",
                           "  GlobalTypeMap(  # all layers"]
    assert "  FirstNTypeMap(  # first 7 layers" in printed
    assert "  RangeTypeMap(  # layers 4:10" in printed
    assert "  LayerMap(9, AlphaBetaRule(alpha=1.0, beta=0.0))," in printed
    assert "  RangeMap(18:19, ZeroRule())," in printed
    assert printed[-2:] == ["  LastLayerMap(PassRule()),  # last layer", ")"]


# -- a residual network: skip connections, parallel branches, first/last -------------------------
@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from lrp_onnx.testing.oracle import export

    torch.manual_seed(0)
    return export(torchvision.models.resnet18().eval(),
                  tmp_path_factory.mktemp("r18") / "resnet18.onnx", torch.zeros(1, 3, 64, 64))


def test_resnet_structure(resnet18: Path) -> None:
    idx = L.show_layer_indices(resnet18)
    assert [type(x).__name__ for x in idx] == [
        "tuple", "tuple", "ChainTuple", "ChainTuple", "ChainTuple", "ChainTuple", "tuple",
        "tuple", "tuple"]
    block = idx[2][0]                        # layer1.0: SkipConnection(conv, conv), Add, relu
    assert isinstance(block[0], L.SkipConnectionTuple)
    assert block[0] == L.SkipConnectionTuple(L.ChainTuple((3, 1, 1, 1, 1), (3, 1, 1, 1, 2)))
    assert block[1:] == ((3, 1, 2), (3, 1, 3))
    down = idx[3][0][0]                      # layer2.0: ParallelTuple(main branch, shortcut)
    assert isinstance(down, L.ParallelTuple) and len(down) == 2
    assert down[1] == L.ChainTuple((4, 1, 1, 2, 1))
    got = nested_rules(resnet18, L.Composite(L.FirstLayerMap(L.FlatRule()),
                                             L.LastLayerMap(L.EpsilonRule())))
    assert got[0] == "FlatRule()" and got[-1] == "EpsilonRule(epsilon=1e-06)"
    assert set(got[1:-1]) == {"ZeroRule()"}
    # a LayerMap on a block prefix reaches every layer inside it
    inside = nested_rules(resnet18, L.Composite(L.LayerMap((4, 1), L.PassRule())))
    flat_idx = [i for t in [L.show_layer_indices(resnet18)] for i in t.leaves()]
    assert [r == "PassRule()" for r in inside] == [i[:2] == (4, 1) for i in flat_idx]
