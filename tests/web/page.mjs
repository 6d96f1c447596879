// The demo page served from web/ and opened in headless Chromium through playwright-core: what
// the page tests share (e2e.mjs, smollm2_chat.mjs).
import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");
export const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../..");
const FLAGS = ["--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-quic"];

/** Serves web/ on a random local port until the process exits; resolves to the page's URL and a stop function. */
export async function serve() {
  const port = 18000 + Math.floor(Math.random() * 2000);
  const url = `http://127.0.0.1:${port}/`;
  const server = spawn("python3", ["-m", "http.server", String(port), "--bind", "127.0.0.1"],
    { cwd: path.join(root, "web"), stdio: "ignore" });
  const stop = () => server.kill();
  process.on("exit", stop);
  for (let i = 0; i < 100; i++) {
    try { if ((await fetch(url)).ok) break; } catch { await new Promise((r) => setTimeout(r, 100)); }
  }
  return { url, stop };
}

/** Opens the page in a fresh headless Chromium, with or without WebGPU. */
export async function open(url, withWebGpu) {
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

/** Waits until the page has finished `n` runs or shows an error; resolves to the error, if any. */
export async function runs(page, n, timeout = 300000) {
  await page.waitForFunction((n) => Number(document.body.dataset.done || 0) >= n || document.body.dataset.error,
    n, { timeout });
  return page.evaluate(() => document.body.dataset.error);
}
