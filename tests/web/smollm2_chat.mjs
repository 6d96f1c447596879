// The page trains SmolLM2-135M-Instruct (the Q4_1 GGUF, picked from disk) on chat JSONL with the
// loss on the assistant's turns: the first conversation shown in the model's ChatML template with
// only the assistant's reply and its end of turn marked, finite losses, the validation loss
// lowered, and a chat sample before and after. Slow on SwiftShader (minutes), so not part of
// `make test`: run it by hand after `make build-web`, with the cache of scripts/fetch-assets and
// the data of scripts/chat-demo-data:
//   PLAYWRIGHT_CORE=~/.cache/portalora/node/node_modules/playwright-core node tests/web/smollm2_chat.mjs
// (METHOD=dora STEPS=N to pick the method and the length).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import assert from "node:assert/strict";
import { serve, open, runs } from "./page.mjs";

const cache = process.env.PORTALORA_CACHE || path.join(os.homedir(), ".cache", "portalora");
const model = path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf");
const chat = fs.readFileSync(path.join(cache, "texts", "hamlet_chat.jsonl"), "utf8").split("\n").slice(0, 16).join("\n");
const STEPS = Number(process.env.STEPS || 2);

const t0 = Date.now();
const secs = () => ((Date.now() - t0) / 1000).toFixed(0) + " s";
const { url, stop } = await serve();
const { browser, page } = await open(url, true);
await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("GPU:") || document.body.dataset.error,
  null, { timeout: 120000 });
await page.setInputFiles("#model-file", [model]);
await page.waitForFunction(() => document.body.dataset.model || document.body.dataset.error, null, { timeout: 600000 });
assert.equal(await page.evaluate(() => document.body.dataset.error), undefined);
console.log(`loaded ${await page.textContent("#model-desc")} at ${secs()}`);
// METHOD=dora (or any method the page offers) trains with that method instead of LoRA.
await page.selectOption("#method", process.env.METHOD || "lora");
await page.fill("#text", chat);
await page.fill("#targets", "q_proj,v_proj");
await page.fill("#steps", String(STEPS));
await page.fill("#batch", "1");
await page.fill("#seq", "96");
await page.fill("#lr", "0.001");
await page.fill("#alpha", "16");
await page.fill("#prompt", "Continue this scene from Hamlet:\n\nMar.\nWhat, has this thing appear'd again to-night?\n\nBer.\nI have seen nothing.");
await page.fill("#sample-tokens", "8");
await page.click("#train");
const err = await runs(page, 1, 3600000);
assert.equal(err, undefined, String(err));
const s = await page.evaluate(() => ({
  val: window.demoState.val, train: window.demoState.train, before: window.demoState.before, after: window.demoState.after,
  marked: [...document.querySelectorAll("#example mark")].map((m) => m.textContent),
  text: document.getElementById("example").textContent, status: document.getElementById("status").textContent,
}));
console.log(s.status);
console.log(`example: ${JSON.stringify(s.text)}\nmarked: ${JSON.stringify(s.marked)}`);
assert.ok(s.text.startsWith("<|im_start|>") && s.text.includes("<|im_start|>assistant\n"), s.text);
// The reply and the end-of-turn text the template writes after it (TRL's assistant mask).
assert.deepEqual(s.marked, ["Ber.\nLong live the king!<|im_end|>\n"], "only the assistant's reply and its end of turn");
assert.ok(s.train.length === STEPS && s.train.every(([, l]) => Number.isFinite(l)), JSON.stringify(s.train));
const [first, last] = [s.val[0][1], s.val[s.val.length - 1][1]];
console.log(`losses ${s.train.map(([, l]) => l.toFixed(4)).join(", ")}; validation ${first.toFixed(4)} → ${last.toFixed(4)}`);
console.log(`before: ${JSON.stringify(s.before)}\nafter: ${JSON.stringify(s.after)}`);
assert.ok(last < first, `validation loss ${first} → ${last}`);
console.log(`SmolLM2 chat in the page passed in ${secs()}`);
await browser.close();
stop();
process.exit(0);
