// End-to-end test of the demo page (web/) in headless Chromium through playwright-core: every
// method trains the bundled tiny model and lowers its validation loss, the chart is drawn, text
// is generated before and after, the adapter downloads as PEFT's two files; a browser without
// WebGPU shows a readable error. Run by `make test-web-e2e` (after `make build-web`).
import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import assert from "node:assert/strict";

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../..");
const port = 18000 + Math.floor(Math.random() * 2000);
const url = `http://127.0.0.1:${port}/`;
const FLAGS = ["--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-quic"];

const server = spawn("python3", ["-m", "http.server", String(port), "--bind", "127.0.0.1"],
  { cwd: path.join(root, "web"), stdio: "ignore" });
const cleanup = () => server.kill();
process.on("exit", cleanup);
for (let i = 0; i < 100; i++) {
  try { if ((await fetch(url)).ok) break; } catch { await new Promise((r) => setTimeout(r, 100)); }
}

async function open(withWebGpu) {
  const userDir = fs.mkdtempSync(path.join(os.tmpdir(), "portalora-chromium-"));
  const browser = await chromium.launchPersistentContext(userDir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    acceptDownloads: true,
    args: withWebGpu ? ["--enable-unsafe-webgpu", ...FLAGS] : FLAGS,
  });
  const page = browser.pages()[0] || (await browser.newPage());
  page.on("pageerror", (e) => console.log("page error:", e.message));
  await page.goto(url);
  return { browser, page };
}

const started = Date.now();
const { browser, page } = await open(true);
await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("GPU:") || document.body.dataset.error,
  null, { timeout: 120000 });
const status = await page.textContent("#status");
assert.ok(status.startsWith("GPU:"), `the engine did not start: ${await page.textContent("#error")}`);
console.log(status);
await page.click("#load-tiny");
await page.waitForFunction(() => document.body.dataset.model || document.body.dataset.error, null, { timeout: 60000 });
assert.equal(await page.evaluate(() => document.body.dataset.error), undefined);

const methods = ["lora", "lora-fa", "vera", "delta-lora", "lora-plus"];
const results = {};
for (const [i, method] of methods.entries()) {
  await page.selectOption("#method", method);
  await page.fill("#rank", method === "vera" ? "16" : "4");
  await page.fill("#steps", "12");
  await page.fill("#lr", method === "vera" ? "0.05" : "0.01");
  await page.click("#train");
  await page.waitForFunction((n) => Number(document.body.dataset.done || 0) >= n || document.body.dataset.error,
    i + 1, { timeout: 300000 });
  const err = await page.evaluate(() => document.body.dataset.error);
  assert.equal(err, undefined, `${method}: ${err}`);
  const s = await page.evaluate(() => ({
    val: window.demoState.val, train: window.demoState.train, before: window.demoState.before,
    after: window.demoState.after, points: document.getElementById("chart").dataset.points,
    tps: document.body.dataset.tokensPerS,
  }));
  const [first, last] = [s.val[0][1], s.val[s.val.length - 1][1]];
  assert.ok(last < first, `${method}: validation loss ${first} → ${last} did not decrease`);
  assert.equal(s.train.length, 12, `${method}: one chart point per step`);
  assert.ok(Number(s.points) >= 12, `${method}: the chart was not drawn`);
  assert.ok(typeof s.before === "string" && typeof s.after === "string", `${method}: no samples`);
  results[method] = { val_before: first, val_after: last, tokens_per_s: Number(s.tps) };
  console.log(`${method}: validation loss ${first.toFixed(4)} → ${last.toFixed(4)}, ${s.tps} tokens/s`);
}

// The adapter downloads as PEFT's two files.
const downloads = [];
page.on("download", (d) => downloads.push(d));
await page.click("#download");
for (let i = 0; i < 100 && downloads.length < 2; i++) await new Promise((r) => setTimeout(r, 100));
assert.equal(downloads.length, 2, "two files download");
const dir = path.join(root, "target", "web-e2e");
fs.mkdirSync(dir, { recursive: true });
for (const d of downloads) await d.saveAs(path.join(dir, d.suggestedFilename()));
const config = JSON.parse(fs.readFileSync(path.join(dir, "adapter_config.json"), "utf8"));
assert.equal(config.peft_type, "LORA");
assert.equal(config.fan_in_fan_out, true);
const st = fs.readFileSync(path.join(dir, "adapter_model.safetensors"));
const headerLen = Number(st.readBigUInt64LE(0));
const header = JSON.parse(st.subarray(8, 8 + headerLen).toString("utf8"));
assert.equal(header.__metadata__.format, "pt");
assert.ok(Object.keys(header).some((k) => k.endsWith("attn.c_attn.lora_A.weight")), "PEFT's key names");
// The downloaded adapter loads back into the page and training continues from it.
await page.setInputFiles("#adapter-file", [path.join(dir, "adapter_config.json"), path.join(dir, "adapter_model.safetensors")]);
await page.waitForFunction(() => document.body.dataset.adapter || document.body.dataset.error, null, { timeout: 60000 });
await page.selectOption("#method", "lora");
await page.fill("#steps", "2");
await page.click("#train");
await page.waitForFunction((n) => Number(document.body.dataset.done || 0) >= n || document.body.dataset.error,
  methods.length + 1, { timeout: 300000 });
assert.equal(await page.evaluate(() => document.body.dataset.error), undefined);
const resumed = await page.evaluate(() => window.demoState.val[0][1]);
assert.ok(resumed < results["lora-plus"].val_before, `starting from the downloaded adapter: validation loss ${resumed}`);
console.log(`from the downloaded adapter: validation loss starts at ${resumed.toFixed(4)}`);
// A GGUF picked from disk: a tiny llama with a SentencePiece vocabulary (as Gemma's GGUFs carry).
await page.setInputFiles("#model-file", [path.join(root, "tests", "fixtures", "tokenizers", "spm.gguf")]);
await page.waitForFunction(() => document.body.dataset.model === "spm.gguf" || document.body.dataset.error, null,
  { timeout: 60000 });
assert.equal(await page.evaluate(() => document.body.dataset.error), undefined);
assert.equal(await page.inputValue("#targets"), "q_proj,v_proj", "the llama model's own targets");
await page.fill("#steps", "4");
await page.click("#train");
await page.waitForFunction((n) => Number(document.body.dataset.done || 0) >= n || document.body.dataset.error,
  methods.length + 2, { timeout: 300000 });
assert.equal(await page.evaluate(() => document.body.dataset.error), undefined);
const spm = await page.evaluate(() => window.demoState.train);
assert.equal(spm.length, 4, "four steps on the picked GGUF");
assert.ok(spm.every(([, l]) => Number.isFinite(l)), `finite losses on the picked GGUF: ${JSON.stringify(spm)}`);
console.log(`a GGUF picked from disk (SentencePiece vocabulary): losses ${spm.map(([, l]) => l.toFixed(3)).join(", ")}`);
// JSONL pasted as the command line reads it: prompt/completion pairs, the loss on completions,
// and the first example shown with its targets highlighted.
const pairs = Array.from({ length: 40 }, (_, i) =>
  JSON.stringify({ prompt: `Question ${i}: what is ${i} plus ${i}?`, completion: ` The answer is ${2 * i}.` }));
await page.fill("#text", pairs.join("\n"));
await page.fill("#steps", "2");
await page.click("#train");
await page.waitForFunction((n) => Number(document.body.dataset.done || 0) >= n || document.body.dataset.error,
  methods.length + 3, { timeout: 300000 });
assert.equal(await page.evaluate(() => document.body.dataset.error), undefined);
const example = await page.evaluate(() => ({
  targets: Number(document.body.dataset.exampleTargets), marked: [...document.querySelectorAll("#example mark")].map((m) => m.textContent).join(""),
  text: document.getElementById("example").textContent, losses: window.demoState.train,
}));
assert.ok(example.text.includes("Question 0: what is 0 plus 0?"), `the first example: ${example.text}`);
assert.ok(example.targets > 0 && example.marked.includes("answer is 0") && !example.marked.includes("Question"),
  `only the completion is marked: ${JSON.stringify(example)}`);
assert.ok(example.losses.length === 2 && example.losses.every(([, l]) => Number.isFinite(l)), JSON.stringify(example.losses));
console.log(`prompt/completion JSONL in the page: targets marked ${JSON.stringify(example.marked)}`);
const shot = path.join(root, "target", "web-e2e.png");
await page.screenshot({ path: shot, fullPage: true });
console.log(`screenshot: ${shot}`);
await browser.close();

// Without WebGPU the page says so in words.
const plain = await open(false);
await plain.page.waitForFunction(() => document.body.dataset.error, null, { timeout: 60000 });
const msg = await plain.page.textContent("#error");
assert.match(msg, /WebGPU/, `the no-WebGPU page shows: ${msg}`);
console.log(`without WebGPU: ${msg}`);
await plain.browser.close();
fs.writeFileSync(path.join(root, "target", "web-e2e.json"), JSON.stringify(results, null, 1));
console.log(`web e2e passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
cleanup();
process.exit(0);
