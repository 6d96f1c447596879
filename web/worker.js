// The engine runs here, off the page's thread: the page stays responsive while the GPU trains.
// Messages in: {cmd: "init" | "load" | "adapter-in" | "adapter-in-gguf" | "train" | "pause" | "stop" |
// "export" | "export-gguf", ...}; messages out: {type: "ready" | "loaded" | "adapter-loaded" |
// "started" | "step" | "eval" | "sample" | "done" | "adapter" | "gguf" | "error", ...}.
import init, { Engine } from "./pkg/portalora.js";

let engine = null;
let running = false;
let paused = false;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The run's loop; what is due after each step (an evaluation, the end) is the engine's to say,
// as it is for the command line's runs.
async function train(m) {
  const summary = JSON.parse(engine.start(JSON.stringify(m.config)));
  postMessage({ type: "started", summary });
  postMessage({ type: "sample", when: "before", prompt: m.prompt, text: await engine.generate(m.prompt, m.tokens) });
  postMessage({ type: "eval", step: 0, loss: await engine.eval() });
  running = true;
  paused = false;
  let step = 0;
  let evaluated = true;
  const t0 = performance.now();
  let tokens = 0;
  while (running) {
    if (paused) {
      await sleep(100);
      continue;
    }
    const s = JSON.parse(await engine.step());
    step = s.step;
    tokens += s.tokens;
    postMessage({ type: "step", ...s, tokens_per_s: tokens / ((performance.now() - t0) / 1000) });
    evaluated = s.evaluate;
    if (s.evaluate) postMessage({ type: "eval", step, loss: await engine.eval() });
    if (s.done) break;
  }
  // Stopped between evaluations: the loss where it stopped.
  if (!evaluated) postMessage({ type: "eval", step, loss: await engine.eval() });
  postMessage({ type: "sample", when: "after", prompt: m.prompt, text: await engine.generate(m.prompt, m.tokens) });
  running = false;
  postMessage({ type: "done", step });
}

onmessage = async (e) => {
  const m = e.data;
  try {
    switch (m.cmd) {
      case "init":
        await init();
        engine = await Engine.create();
        postMessage({ type: "ready", info: JSON.parse(engine.info()) });
        break;
      case "load": {
        const desc = m.kind === "gguf"
          ? engine.loadGguf(m.name, new Uint8Array(m.bytes))
          : engine.loadSafetensors(m.name, m.config, new Uint8Array(m.bytes), m.tokenizer ? new Uint8Array(m.tokenizer) : undefined, m.tokenizerConfig);
        postMessage({ type: "loaded", model: JSON.parse(desc), defaults: JSON.parse(engine.defaults()) });
        break;
      }
      case "adapter-in-gguf":
        postMessage({ type: "adapter-loaded", adapter: JSON.parse(engine.loadAdapterGguf(m.name, new Uint8Array(m.bytes))) });
        break;
      case "export-gguf": {
        const [bytes, notes] = await engine.exportGguf(m.merged);
        postMessage({ type: "gguf", name: m.name, merged: m.merged, bytes, notes: JSON.parse(notes) }, [bytes.buffer]);
        break;
      }
      case "adapter-in":
        postMessage({ type: "adapter-loaded", adapter: JSON.parse(engine.loadAdapter(m.config, new Uint8Array(m.bytes))) });
        break;
      case "train":
        await train(m);
        break;
      case "pause":
        paused = !paused;
        postMessage({ type: "paused", paused });
        break;
      case "stop":
        running = false;
        break;
      case "export": {
        const [config, bytes] = await engine.exportAdapter();
        postMessage({ type: "adapter", config, bytes }, [bytes.buffer]);
        break;
      }
    }
  } catch (err) {
    running = false;
    postMessage({ type: "error", message: String((err && err.message) || err) });
  }
};
