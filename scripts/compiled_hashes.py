"""SHA-256 of compiled models: proof that a refactor left the compiler's output byte-identical.

    python scripts/compiled_hashes.py [--models seed,digits,vgg16,resnet50] [--json FILE]
    python scripts/compiled_hashes.py --compare BEFORE.json AFTER.json

Compiles each model with three presets (EpsilonPlusFlat, EpsilonGammaBox(-3, 3),
EpsilonAlpha2Beta1) and prints the SHA-256 of the input model's bytes and of the compiled
model's bytes. ``seed`` and ``digits`` are the models shipped in ``models/``; ``vgg16`` and
``resnet50`` are torchvision models with random weights (``torch.manual_seed(0)``) exported by
torch's legacy exporter (opset 17, dynamic batch), which needs the test dependencies.

Only the public API (``lrp_onnx.LRP``) is used, so the same script runs against an older checkout
(``PYTHONPATH=<old checkout> python scripts/compiled_hashes.py``) and the current one; the
committed hashes of ``tests/test_compiled_bytes.py`` come from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")


def composite(name: str) -> Any:
    import lrp_onnx

    if name == "EpsilonGammaBox":
        return lrp_onnx.EpsilonGammaBox(-3.0, 3.0)
    return getattr(lrp_onnx, name)()


def torchvision_export(name: str, directory: Path) -> Path:
    """torchvision ``name`` with seed-0 random weights, exported with a dynamic batch."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    path = directory / f"{name}.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


def model_path(name: str, directory: Path) -> Path:
    if name == "seed":
        return ROOT / "models" / "seed_vgg.onnx"
    if name == "digits":
        return ROOT / "models" / "digits_cnn.onnx"
    if name in ("vgg16", "resnet50"):
        return torchvision_export(name, directory)
    raise SystemExit(f"unknown model {name!r}")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hashes(names: list[str]) -> dict[str, dict[str, str]]:
    """``{model: {"input": sha, preset: sha, ...}}``."""
    from lrp_onnx import LRP

    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = model_path(name, Path(tmp))
            entry = {"input": digest(path.read_bytes())}
            for preset in PRESETS:
                entry[preset] = digest(LRP(str(path), composite(preset)).model
                                       .SerializeToString())
            out[name] = entry
            if path.parent == Path(tmp):
                path.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="seed,digits,vgg16,resnet50")
    parser.add_argument("--json", help="write the hashes to this file")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        bad = [f"{m}/{k}" for m in before for k in before[m]
               if after.get(m, {}).get(k) != before[m][k]]
        print("identical" if not bad else "differ: " + ", ".join(bad))
        return 1 if bad else 0
    result = hashes(args.models.split(","))
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
