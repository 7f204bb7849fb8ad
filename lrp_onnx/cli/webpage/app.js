// The page of `lrp-onnx export-web`: runs the compiled model with onnxruntime-web (WebAssembly)
// on an image and draws its relevance. Preprocessing and colours follow `lrp-onnx explain`
// (docs/web.md): L or RGB, bilinear resize to the model's H x W, (pixel * scale - mean) / std,
// heatmap = channel sum scaled by the 99.5th percentile of |R|, blue-white-red.
import * as ort from "./ort/ort.wasm.bundle.min.mjs";

// Only the binary's URL: the bundle embeds its Emscripten glue (a prefix would fetch a .mjs).
ort.env.wasm.wasmPaths = { wasm: new URL("./ort/ort-wasm-simd-threaded.wasm", import.meta.url).href };
ort.env.wasm.numThreads = 1; // no SharedArrayBuffer: no cross-origin isolation needed

const $ = (id) => document.getElementById(id);
let config, session;
try {
  config = await (await fetch("lrp-web.json")).json();
  session = await ort.InferenceSession.create(config.model, { executionProviders: ["wasm"] });
} catch (err) {
  $("status").textContent = `cannot load the model: ${err.message} (serve this folder over ` +
    "HTTP, not as file://)";
  throw err;
}

/** Run the compiled model: `data` float32 NCHW of shape `dims`, `target` one class per sample
 * (-1: the top class). Returns plain arrays: logits [N, K], target [N], relevance (as `dims`). */
async function explainArray(data, dims, target = -1) {
  const n = dims[0];
  const targets = Array.isArray(target) ? target : new Array(n).fill(target);
  const out = await session.run({
    [config.input]: new ort.Tensor("float32", Float32Array.from(data), dims),
    target: new ort.Tensor("int64", BigInt64Array.from(targets.map(BigInt)), [n]),
  });
  const logits = out[config.output], rel = out.relevance;
  const k = logits.dims[logits.dims.length - 1];
  const chosen = targets.map((t, i) => (t >= 0 ? t : argmax(logits.data.subarray(i * k, (i + 1) * k))));
  return { logits: Array.from(logits.data), logitsDims: Array.from(logits.dims), target: chosen,
           relevance: Array.from(rel.data), relevanceDims: Array.from(rel.dims) };
}
globalThis.explainArray = explainArray; // the test hook (tests/test_web.py)

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/** Pillow's 8-bit resampling with the bilinear (triangle) filter along one axis, bit for bit:
 * the support widens by the scale when downscaling, the normalised weights become 22-bit fixed
 * point, each output is rounded and clipped to 0..255. `src` holds `lines` lines of `inLen`
 * values, value `i` of line `l` at `src[at(l, i)]`; the result is `lines` x `outLen`. */
function resampleAxis(src, inLen, outLen, lines, at) {
  const PRECISION = 2 ** 22, out = new Uint8Array(lines * outLen), scale = inLen / outLen;
  const support = Math.max(scale, 1);
  for (let o = 0; o < outLen; o++) {
    const center = (o + 0.5) * scale;
    const lo = Math.max(0, Math.trunc(center - support + 0.5));
    const hi = Math.min(inLen, Math.trunc(center + support + 0.5));
    const w = [];
    let total = 0;
    for (let i = lo; i < hi; i++) {
      const v = Math.max(0, 1 - Math.abs((i - center + 0.5) / support));
      w.push(v); total += v;
    }
    const fixed = w.map((v) => Math.trunc(0.5 + (total ? v / total : 0) * PRECISION));
    for (let l = 0; l < lines; l++) {
      let acc = PRECISION / 2;
      for (let i = lo; i < hi; i++) acc += fixed[i - lo] * src[at(l, i)];
      out[l * outLen + o] = Math.min(255, Math.max(0, Math.floor(acc / PRECISION)));
    }
  }
  return out;
}

/** An image element as the model input, as `lrp-onnx explain` reads an image file: Pillow's
 * `convert("L")` or RGB, `resize((W, H), BILINEAR)` (horizontal pass, then vertical), then
 * `(pixel * scale - mean[c]) / std[c]` in float64, rounded once to float32. Returns the
 * Float32Array [1, C, H, W] and its dims. */
function preprocess(img) {
  const pre = config.preprocess, c = config.channels;
  const iw = img.naturalWidth, ih = img.naturalHeight;
  const [h, w] = pre.size ?? [ih, iw];
  const ctx = new OffscreenCanvas(iw, ih).getContext("2d");
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, iw, ih).data, x = new Float32Array(c * h * w);
  for (let ch = 0; ch < c; ch++) {
    let plane = new Uint8Array(iw * ih);
    for (let p = 0; p < iw * ih; p++) {
      const [r, g, b] = [rgba[4 * p], rgba[4 * p + 1], rgba[4 * p + 2]];
      // Pillow's convert("L"): ITU-R 601-2 luma in 16-bit fixed point, rounded.
      plane[p] = c === 1 ? (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16 : rgba[4 * p + ch];
    }
    let pw = iw;
    if (w !== iw) { plane = resampleAxis(plane, iw, w, ih, (l, i) => l * iw + i); pw = w; }
    if (h !== ih) {  // the result is column-major: transpose back while reading below
      const cols = resampleAxis(plane, ih, h, pw, (l, i) => i * pw + l);
      plane = new Uint8Array(h * w);
      for (let y = 0; y < h; y++) for (let xx = 0; xx < w; xx++) plane[y * w + xx] = cols[xx * h + y];
    }
    const mean = pre.mean.length > 1 ? pre.mean[ch] : pre.mean[0];
    const std = pre.std.length > 1 ? pre.std[ch] : pre.std[0];
    for (let p = 0; p < h * w; p++) x[ch * h * w + p] = (plane[p] * pre.scale - mean) / std;
  }
  return { data: x, dims: [1, c, h, w] };
}

/** The blue-white-red heatmap of `explain`: channel sum, scaled by the 99.5th percentile of
 * |R| (numpy's linear interpolation; the largest |R| where that is 0), clipped to [-1, 1]. */
function drawHeatmap(canvas, rel, dims) {
  const [, c, h, w] = dims, r = new Float64Array(h * w);
  for (let ch = 0; ch < c; ch++) for (let p = 0; p < h * w; p++) r[p] += rel[ch * h * w + p];
  const mag = Array.from(r, Math.abs).sort((a, b) => a - b);
  const pos = (0.995 * (mag.length - 1)), lo = Math.floor(pos);
  let scale = mag[lo] + (pos - lo) * ((mag[Math.min(lo + 1, mag.length - 1)]) - mag[lo]);
  if (!(scale > 0)) scale = mag[mag.length - 1];
  const image = new ImageData(w, h);
  for (let p = 0; p < h * w; p++) {
    const v = scale > 0 ? Math.max(-1, Math.min(1, r[p] / scale)) : 0;
    const fade = Math.round(255 * (1 - Math.abs(v)));
    image.data.set([v >= 0 ? 255 : fade, fade, v >= 0 ? fade : 255, 255], 4 * p);
  }
  canvas.width = w; canvas.height = h;
  canvas.getContext("2d").putImageData(image, 0, 0);
}

/** The model input as the model sees it: its values min-max scaled to grey (1 channel) or
 * RGB (3 channels), after resizing and normalising. */
function drawInput(canvas, data, dims) {
  const [, c, h, w] = dims, image = new ImageData(w, h);
  let lo = Infinity, hi = -Infinity;
  for (const v of data) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const level = (v) => (hi > lo ? Math.round((255 * (v - lo)) / (hi - lo)) : 128);
  for (let p = 0; p < h * w; p++) {
    const rgb = [0, 1, 2].map((k) => level(data[(c === 3 ? k : 0) * h * w + p]));
    image.data.set([...rgb, 255], 4 * p);
  }
  canvas.width = w; canvas.height = h;
  canvas.getContext("2d").putImageData(image, 0, 0);
}

/** Explain one image element and show the result; resolves when drawn. */
async function explainImage(img) {
  const { data, dims } = preprocess(img);
  const t0 = performance.now();
  const res = await explainArray(data, dims, Number($("target").value));
  const ms = performance.now() - t0, t = res.target[0];
  const sum = res.relevance.reduce((a, b) => a + b, 0);
  $("prediction").textContent =
    `class ${t}: output ${res.logits[t].toFixed(3)}, relevance sum ${sum.toFixed(3)}`;
  $("status").textContent = `explained in ${ms.toFixed(0)} ms (onnxruntime-web ` +
    `${config.onnxruntime_web}, wasm)`;
  drawInput($("input"), data, dims);
  drawHeatmap($("heatmap"), res.relevance, dims);
  return { ...res, input: Array.from(data) };
}
globalThis.explainImageUrl = (url) => new Promise((resolve, reject) => {
  const img = new Image();
  img.onload = () => explainImage(img).then(resolve, reject);
  img.onerror = () => reject(new Error(`cannot decode ${url}`));
  img.src = url;
});

async function explainFile(file) {
  const url = URL.createObjectURL(file);
  try { await globalThis.explainImageUrl(url); }
  catch (err) { $("status").textContent = `error: ${err.message}`; }
  finally { URL.revokeObjectURL(url); }
}

for (let k = 0; k < config.classes; k++) $("target").add(new Option(`class ${k}`, String(k)));
$("file").addEventListener("change", (e) => e.target.files[0] && explainFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) explainFile(e.dataTransfer.files[0]);
});
$("status").textContent = `model loaded: input '${config.input}', ${config.classes} classes; ` +
  "drop or pick an image";
globalThis.lrpReady = true;
