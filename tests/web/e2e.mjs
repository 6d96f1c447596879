// End-to-end test of the demo page (web/) in headless Chromium through playwright-core: every
// method trains the bundled tiny model and lowers its validation loss, the chart is drawn, text
// is generated before and after, the adapter downloads as PEFT's two files; a browser without
// WebGPU shows a readable error. Run by `make test-web-e2e` (after `make build-web`).
import fs from "node:fs";
import path from "node:path";
import assert from "node:assert/strict";
import { root, serve, open as openPage, runs } from "./page.mjs";

const { url, stop: cleanup } = await serve();
const open = (withWebGpu) => openPage(url, withWebGpu);

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

// The fields start at the command line's defaults (rows within the tiny model's context of 40);
// only the settings the method uses are shown, and VeRA's rank is its own default.
const ids = ["rank", "alpha", "lr", "batch", "seq", "eval-every", "sample-tokens"];
const fields = await page.evaluate((ids) => Object.fromEntries(ids.map((id) => [id, document.getElementById(id).value])), ids);
assert.deepEqual(fields, { rank: "8", alpha: "8", lr: "0.0002", batch: "4", seq: "40", "eval-every": "0", "sample-tokens": "32" });
assert.equal(await page.inputValue("#activations"), "f32", "activations kept as f32 by default");
assert.equal(await page.isVisible("#lr-ratio"), false, "LoRA+'s ratio is hidden for LoRA");
await page.selectOption("#method", "vera");
assert.equal(await page.inputValue("#rank"), "256", "VeRA's default rank");
assert.equal(await page.isVisible("#alpha"), false, "VeRA has no alpha");
await page.selectOption("#method", "lora-plus");
assert.equal(await page.inputValue("#rank"), "8");
assert.equal(await page.isVisible("#lr-ratio"), true);

const methods = ["lora", "lora-fa", "vera", "delta-lora", "dora", "lora-plus"];
const results = {};
for (const [i, method] of methods.entries()) {
  await page.selectOption("#method", method);
  await page.fill("#rank", method === "vera" ? "16" : "4");
  await page.fill("#steps", "12");
  await page.fill("#lr", method === "vera" ? "0.05" : "0.01");
  if (method === "delta-lora") await page.fill("#delta-warmup", "2"); // the default 500 is past a 12-step run
  // One method keeps its activations as f16 (the page's memory-saving setting).
  await page.selectOption("#activations", method === "lora-fa" ? "f16" : "f32");
  await page.click("#train");
  const err = await runs(page, i + 1);
  assert.equal(err, undefined, `${method}: ${err}`);
  assert.equal(await page.evaluate(() => document.body.dataset.activations), method === "lora-fa" ? "f16" : "f32",
    `${method}: the activations setting reached the engine`);
  assert.equal(await page.isDisabled("#download-gguf"), ["dora", "delta-lora"].includes(method),
    `${method}: a GGUF LoRA file only where llama.cpp can run one`);
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
// And as a GGUF LoRA adapter (the merged file needs a model loaded as GGUF: disabled here).
assert.equal(await page.isDisabled("#download-merged"), true, "no merged GGUF from a safetensors model");
/** The next download the button `id` starts, saved under target/web-e2e; resolves to its path. */
async function download(id) {
  const [d] = await Promise.all([page.waitForEvent("download", { timeout: 120000 }), page.click(id)]);
  const to = path.join(dir, d.suggestedFilename());
  await d.saveAs(to);
  return to;
}
const ggufAdapter = await download("#download-gguf");
const gb = fs.readFileSync(ggufAdapter);
assert.equal(gb.subarray(0, 4).toString(), "GGUF");
assert.ok(gb.includes("adapter.lora.alpha") && gb.includes("blk.0.attn_qkv.weight.lora_a"), "llama.cpp's adapter keys and names");
let done = methods.length;
// The downloaded adapter loads back into the page and training continues from it.
await page.setInputFiles("#adapter-file", [path.join(dir, "adapter_config.json"), path.join(dir, "adapter_model.safetensors")]);
await page.waitForFunction(() => document.body.dataset.adapter || document.body.dataset.error, null, { timeout: 60000 });
await page.selectOption("#method", "lora");
await page.fill("#steps", "2");
await page.click("#train");
assert.equal(await runs(page, ++done), undefined);
const resumed = await page.evaluate(() => window.demoState.val[0][1]);
assert.ok(resumed < results["lora-plus"].val_before, `starting from the downloaded adapter: validation loss ${resumed}`);
console.log(`from the downloaded adapter: validation loss starts at ${resumed.toFixed(4)}`);
// The GGUF adapter loads back too, and is the same adapter.
await page.evaluate(() => delete document.body.dataset.adapter);
await page.setInputFiles("#adapter-file", [ggufAdapter]);
await page.waitForFunction(() => document.body.dataset.adapter || document.body.dataset.error, null, { timeout: 60000 });
await page.click("#train");
assert.equal(await runs(page, ++done), undefined);
const fromGguf = await page.evaluate(() => window.demoState.val[0][1]);
assert.ok(Math.abs(fromGguf - resumed) < 1e-4, `from the GGUF adapter ${fromGguf}, from PEFT's files ${resumed}`);
console.log(`from the downloaded GGUF adapter: validation loss starts at ${fromGguf.toFixed(4)}`);
// A GGUF picked from disk: a tiny llama with a SentencePiece vocabulary (as Gemma's GGUFs carry).
await page.setInputFiles("#model-file", [path.join(root, "tests", "fixtures", "tokenizers", "spm.gguf")]);
await page.waitForFunction(() => document.body.dataset.model === "spm.gguf" || document.body.dataset.error, null,
  { timeout: 60000 });
assert.equal(await page.evaluate(() => document.body.dataset.error), undefined);
assert.equal(await page.inputValue("#targets"), "q_proj,v_proj", "the llama model's own targets");
await page.fill("#steps", "4");
await page.click("#train");
assert.equal(await runs(page, ++done), undefined);
const spm = await page.evaluate(() => window.demoState.train);
assert.equal(spm.length, 4, "four steps on the picked GGUF");
assert.ok(spm.every(([, l]) => Number.isFinite(l)), `finite losses on the picked GGUF: ${JSON.stringify(spm)}`);
// A model loaded as GGUF downloads merged: the base's metadata (its tokenizer) with the adapter in.
const merged = fs.readFileSync(await download("#download-merged"));
const spmBytes = fs.readFileSync(path.join(root, "tests", "fixtures", "tokenizers", "spm.gguf"));
assert.equal(merged.subarray(0, 4).toString(), "GGUF");
assert.ok(merged.includes("tokenizer.ggml.tokens") && Math.abs(merged.length - spmBytes.length) < 4096,
  `a merged GGUF of ${merged.length} bytes beside the base's ${spmBytes.length}`);
console.log(`merged GGUF from the page: ${merged.length} bytes`);
console.log(`a GGUF picked from disk (SentencePiece vocabulary): losses ${spm.map(([, l]) => l.toFixed(3)).join(", ")}`);
// JSONL pasted as the command line reads it: prompt/completion pairs, the loss on completions,
// and the first example shown with its targets highlighted.
const pairs = Array.from({ length: 40 }, (_, i) =>
  JSON.stringify({ prompt: `Question ${i}: what is ${i} plus ${i}?`, completion: ` The answer is ${2 * i}.` }));
await page.fill("#text", pairs.join("\n"));
await page.fill("#steps", "2");
await page.click("#train");
assert.equal(await runs(page, ++done), undefined);
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
