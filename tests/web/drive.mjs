// Drives the page of `lrp-onnx export-web` in the system Chromium (tests/test_web.py):
//   node drive.mjs CHROMIUM URL REQUEST.json RESULT.json [SCREENSHOT.png]
// REQUEST.json: {"calls": [{"data": [...], "dims": [...], "target": ...}], "image": "x.png"}.
// Each call runs the page's explainArray hook; "image" is then explained as a dropped image
// would be (explainImageUrl) and the page is screenshotted. RESULT.json: {"calls": [...],
// "image": {...}, "console": [...]}.
import { readFileSync, writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [executablePath, url, requestPath, resultPath, screenshot] = process.argv.slice(2);
const request = JSON.parse(readFileSync(requestPath, "utf8"));
// --no-sandbox: Chromium's sandbox needs user namespaces, absent when running as root in CI.
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const result = { calls: [], console: [] };
try {
  const page = await browser.newPage({ viewport: { width: 720, height: 560 } });
  page.on("console", (msg) => result.console.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (err) => result.console.push(`pageerror: ${err.message}`));
  await page.goto(url);
  await page.waitForFunction(() => globalThis.lrpReady === true, null, { timeout: 30000 });
  for (const call of request.calls) {
    result.calls.push(await page.evaluate(({ data, dims, target }) =>
      globalThis.explainArray(new Float32Array(data), dims, target), call));
  }
  if (request.image) {
    result.image = await page.evaluate((u) => globalThis.explainImageUrl(u), request.image);
    if (screenshot) await page.screenshot({ path: screenshot });
  }
} finally {
  await browser.close();
  writeFileSync(resultPath, JSON.stringify(result));
}
