"""Export the seed page's VGG-like model to models/seed_vgg.onnx (fixed seeds, reproducible).

    python scripts/export_seed_model.py [--out models]

Writes ``seed_vgg.onnx`` (torch legacy exporter, opset 17, dynamic batch, module scopes in the
node names) with an inference-mode Dropout(0.5) inserted where the seed model has one (torch's
eval export drops it), and ``seed_vgg_input.npy``, one 3x32x32 sample for the README's example.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from lrp_onnx.testing.oracle import export, insert_dropout, seed_vgg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = seed_vgg(seed=0)
    params = sum(p.numel() for p in model.parameters())
    assert params == 580_396, params
    example = torch.zeros(1, 3, 32, 32)
    path = export(model, out / "seed_vgg.onnx", example)
    insert_dropout(path, after="/1/1.2/Relu", ratio=0.5, name="/1/1.3/Dropout")
    sample = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    np.save(out / "seed_vgg_input.npy", sample)
    print(f"wrote {path} ({params:,} parameters) and {out / 'seed_vgg_input.npy'}")


if __name__ == "__main__":
    main()
