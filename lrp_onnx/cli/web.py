"""``lrp-onnx export-web``: a static page that explains images in the browser.

The folder written holds ``index.html`` and ``app.js`` (the page, plain ES modules, no build
step), the compiled model, ``lrp-web.json`` (the model's input and the image preprocessing) and
the vendored onnxruntime-web files (:data:`ORT_FILES`, the WebAssembly build only). Those are
copied from an npm package of ``onnxruntime-web``, never downloaded here: ``--ort-web`` names
an installed package folder, its ``dist`` folder or an ``npm pack`` tarball; without it
``./node_modules/onnxruntime-web`` is used. The folder is written next to ``DIR`` under a
temporary name and renamed into place, so a failure leaves no partial folder (docs/web.md).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import tarfile
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from lrp_onnx.errors import InvalidInput

#: The onnxruntime-web release the page is tested with (tests/web/package.json pins it too).
ORT_WEB_VERSION = "1.31.1"
#: The files of onnxruntime-web the page loads: the WebAssembly-only ES module bundle (it
#: embeds the Emscripten glue) and the SIMD WebAssembly binary it instantiates.
ORT_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm")
#: The page's own files, shipped in ``lrp_onnx/cli/webpage``.
PAGE_FILES = ("index.html", "app.js")
MODEL_FILE = "model.lrp.onnx"
CONFIG_FILE = "lrp-web.json"
HOW_TO_GET = (f"run `npm install onnxruntime-web@{ORT_WEB_VERSION}` in this folder, or "
              f"`npm pack onnxruntime-web@{ORT_WEB_VERSION}` and pass --ort-web "
              f"onnxruntime-web-{ORT_WEB_VERSION}.tgz")


class WebExportError(InvalidInput):
    """A model, folder or onnxruntime-web source ``export-web`` refuses (one line, exit 1)."""


def _package_version(meta: bytes, where: str) -> str:
    try:
        info = json.loads(meta)
    except ValueError:
        raise WebExportError(f"{where}: package.json is not valid JSON") from None
    if not isinstance(info, dict) or info.get("name") != "onnxruntime-web":
        raise WebExportError(f"{where}: not the onnxruntime-web npm package; {HOW_TO_GET}")
    return str(info.get("version", "?"))


def read_ort_web(source: str | None) -> tuple[str, dict[str, bytes]]:
    """The version and :data:`ORT_FILES` of onnxruntime-web from ``source`` (a package folder,
    its ``dist`` folder or an ``npm pack`` ``.tgz``; ``None``: ``./node_modules``).

    Raises:
        WebExportError: no such package, or a file the page needs is missing from it.
    """
    path = Path(source) if source else Path("node_modules") / "onnxruntime-web"
    where = str(path) if source else f"onnxruntime-web not found ({path} does not exist)"
    if not path.exists():
        raise WebExportError(f"{where}{': no such file or folder' if source else ''}; "
                             f"{HOW_TO_GET}")
    if path.is_file():
        try:
            with tarfile.open(path, "r:gz") as tar:
                names = set(tar.getnames())
                wanted = ["package/package.json", *(f"package/dist/{f}" for f in ORT_FILES)]
                missing = [n for n in wanted if n not in names]
                if missing:
                    raise WebExportError(f"{path}: the tarball lacks {missing[0]}; {HOW_TO_GET}")
                data = {n: tar.extractfile(n).read() for n in wanted}  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise WebExportError(f"{path}: not a readable npm tarball ({exc})") from None
        version = _package_version(data["package/package.json"], str(path))
        return version, {f: data[f"package/dist/{f}"] for f in ORT_FILES}
    pkg = path.parent if path.name == "dist" and not (path / "dist").is_dir() else path
    meta = pkg / "package.json"
    if not meta.is_file():
        raise WebExportError(f"{path}: no package.json (not an onnxruntime-web package); "
                             f"{HOW_TO_GET}")
    version = _package_version(meta.read_bytes(), str(pkg))
    missing = [f for f in ORT_FILES if not (pkg / "dist" / f).is_file()]
    if missing:
        raise WebExportError(f"{pkg}: onnxruntime-web {version} lacks dist/{missing[0]} (the "
                             f"page is tested with {ORT_WEB_VERSION}); {HOW_TO_GET}")
    return version, {f: (pkg / "dist" / f).read_bytes() for f in ORT_FILES}


def page_config(model_path: str, preprocess: str | None) -> tuple[bytes, dict[str, Any]]:
    """The compiled model's bytes (the file's, external data put inside) and the page's
    ``lrp-web.json``: the input and output names, the channel and class counts and the resolved
    image preprocessing (``explain``'s defaults, or ``preprocess``, a ``--preprocess`` file).

    Raises:
        WebExportError: not a compiled model, or one whose input is not an image.
    """
    from lrp_onnx.cli.compiled import CompiledIO
    from lrp_onnx.cli.inputs import ModelInput, Preprocess, load_preprocess
    from lrp_onnx.frontend.load import load_model

    info: dict[str, Any] = {}
    model, label = load_model(model_path, info)
    io = CompiledIO.of(model, label, "lrp-onnx")
    if io.tokens or io.seed is not None:
        raise WebExportError(f"{label}: the page explains images with a 'target' seed; this "
                             "model was compiled on token ids or with --output-relevance")
    spec = ModelInput.of(model, io.input)
    pre = Preprocess()
    if preprocess:
        pre = pre.updated(**load_preprocess(preprocess))
    try:
        pre = pre.resolve(spec)
    except InvalidInput as exc:
        raise WebExportError(f"{label}: {exc}") from None
    if not pre.resize:
        raise WebExportError(f"{preprocess}: 'resize': false is not supported by the page")
    settings = asdict(pre)
    del settings["resize"]
    config = {"model": MODEL_FILE, "input": io.input, "output": io.output,
              "channels": spec.channels, "classes": io.classes, "preprocess": settings}
    # The file as it is; weights stored as external data are put inside (one file to fetch).
    data = model.SerializeToString() if info.get("external_data") else Path(model_path).read_bytes()
    return data, config


def export_web(model_path: str, out: Path, ort_web: str | None, preprocess: str | None
               ) -> tuple[str, dict[str, Any]]:
    """Write the page folder ``out`` (see the module docstring); returns the vendored
    onnxruntime-web version and the page's config.

    Raises:
        WebExportError: ``out`` exists and is not an empty folder, or a refused input.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WebExportError(f"{out}: exists and is not an empty folder; choose a new DIR")
    if not out.parent.is_dir():
        raise WebExportError(f"{out}: folder {out.parent} does not exist")
    model_bytes, config = page_config(model_path, preprocess)
    version, ort_files = read_ort_web(ort_web)
    config["onnxruntime_web"] = version
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    try:
        (tmp / "ort").mkdir(parents=True)
        page = resources.files("lrp_onnx.cli") / "webpage"
        for name in PAGE_FILES:
            (tmp / name).write_bytes((page / name).read_bytes())
        for name, data in ort_files.items():
            (tmp / "ort" / name).write_bytes(data)
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version, config


def cmd_export_web(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    version, config = export_web(args.model, out, args.ort_web, args.preprocess)
    pre = config["preprocess"]
    size = "x".join(map(str, pre["size"])) if pre["size"] else "the image's own size"
    print(f"wrote {out}: index.html, app.js, {MODEL_FILE}, {CONFIG_FILE} ({pre['mode']}, "
          f"{size}), ort/ (onnxruntime-web {version}, WebAssembly)")
    print(f"serve it over HTTP, e.g. `python -m http.server -d {out}`, and open "
          "http://localhost:8000/")
    return 0


def add_export_web_parser(sub: Any) -> None:
    """The ``export-web`` subcommand."""
    p = sub.add_parser(
        "export-web", help="write a static web page that explains images in the browser",
        description="Write DIR: a page (HTML + JS, no build step) that runs COMPILED with "
        "onnxruntime-web (WebAssembly) on an image the user drops or picks, and shows the "
        "prediction and the heatmap. onnxruntime-web is copied from an npm package (docs/web.md).")
    p.add_argument("model", metavar="COMPILED", help="compiled .onnx model (lrp-onnx convert)")
    p.add_argument("dir", metavar="DIR", help="folder to write (must not exist, or be empty)")
    p.add_argument("--ort-web", metavar="PATH",
                   help="onnxruntime-web: an installed package folder, its dist folder or an "
                   "`npm pack` .tgz (default: ./node_modules/onnxruntime-web; tested with "
                   f"{ORT_WEB_VERSION})")
    p.add_argument("--preprocess", metavar="FILE.json",
                   help="image preprocessing as for explain: keys size, mode, scale, mean, std "
                   "(default: the model's H x W, L or RGB by channels, scale 1/255)")
    p.set_defaults(func=cmd_export_web)
