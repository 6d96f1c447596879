// The demo page: UI, loss chart and downloads. All GPU work happens in worker.js.
const $ = (id) => document.getElementById(id);
const worker = new Worker("worker.js", { type: "module" });
const state = { train: [], val: [], model: null, busy: false };
window.demoState = state; // read by the end-to-end test

const DEFAULT_TEXT = `To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream: ay, there's the rub.
`;
$("text").value = DEFAULT_TEXT.repeat(4);

function error(msg) {
  $("error").textContent = msg ? "Error: " + msg : "";
  if (msg) setBusy(false);
}
function status(msg) {
  $("status").textContent = msg;
}
function setBusy(b) {
  state.busy = b;
  $("train").disabled = b || !state.model;
  $("pause").disabled = !b;
  $("stop").disabled = !b;
}

// The loss chart: train loss per step (blue) and validation loss (orange dots and line).
function draw() {
  const c = $("chart");
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const pts = state.train.concat(state.val);
  if (pts.length === 0) return;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = Math.max((y1 - y0) * 0.1, 1e-3);
  y0 -= pad; y1 += pad;
  const L = 50, R = 10, T = 10, B = 25;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (c.width - L - R);
  const py = (y) => T + ((y1 - y) / (y1 - y0)) * (c.height - T - B);
  g.strokeStyle = "#999"; g.strokeRect(L, T, c.width - L - R, c.height - T - B);
  g.fillStyle = "#444"; g.font = "12px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    g.fillText(y.toFixed(y1 - y0 < 0.05 ? 3 : 2), 4, py(y) + 4);
  }
  g.fillText("step " + x1, c.width - 60, c.height - 6);
  const line = (p, color) => {
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    p.forEach(([x, y], i) => (i ? g.lineTo(px(x), py(y)) : g.moveTo(px(x), py(y))));
    g.stroke();
  };
  line(state.train, "#1f77b4");
  line(state.val, "#ff7f0e");
  g.fillStyle = "#ff7f0e";
  state.val.forEach(([x, y]) => { g.beginPath(); g.arc(px(x), py(y), 3.5, 0, 7); g.fill(); });
  c.dataset.points = String(pts.length);
}

worker.onmessage = (e) => {
  const m = e.data;
  switch (m.type) {
    case "ready":
      status(`GPU: ${m.info.name || "WebGPU adapter"} (${m.info.backend})${m.info.subgroups ? ", subgroups of " + m.info.subgroup_min_size : ""}${m.info.shader_f16 ? ", f16" : ", no f16"}`);
      $("load-tiny").disabled = false;
      break;
    case "loaded":
      state.model = m.model;
      showDefaults(m.defaults);
      // A new model drops the adapter loaded for the previous one.
      $("adapter-desc").textContent = "";
      $("adapter-file").value = "";
      delete document.body.dataset.adapter;
      $("model-desc").textContent = ` ${m.model.name}: ${m.model.arch}, ${m.model.layers} layers, ${(m.model.parameters / 1e6).toFixed(2)} M parameters` +
        m.model.notes.map((n) => `; note: ${n}`).join("");
      if (m.model.arch === "Llama" && $("targets").value.includes("c_attn")) $("targets").value = "q_proj,v_proj";
      if (m.model.arch === "Gpt2" && $("targets").value.includes("q_proj")) $("targets").value = "c_attn,c_proj,c_fc";
      setBusy(false);
      document.body.dataset.model = m.model.name;
      break;
    case "started":
      status(`training: ${m.summary.train_rows} rows of ${m.summary.settings.seq} tokens (${m.summary.val_rows} for validation), batch ${m.summary.settings.batch}, ${m.summary.trainable} trainable parameters, ` +
        `${(m.summary.kept_bytes / 2 ** 20).toFixed(1)} MiB kept for backward (${m.summary.settings.activations})` +
        m.summary.notes.map((n) => `; note: ${n}`).join(""));
      document.body.dataset.activations = m.summary.settings.activations;
      showExample(m.summary.example);
      break;
    case "step":
      state.train.push([m.step, m.loss]);
      $("speed").textContent = `step ${m.step}  loss ${m.loss.toFixed(4)}  ${m.tokens_per_s.toFixed(0)} tokens/s`;
      document.body.dataset.tokensPerS = m.tokens_per_s.toFixed(1);
      draw();
      break;
    case "eval":
      state.val.push([m.step, m.loss]);
      draw();
      break;
    case "sample":
      $(m.when).textContent = m.prompt + "▌" + m.text;
      state[m.when] = m.text;
      break;
    case "paused":
      $("pause").textContent = m.paused ? "Resume" : "Pause";
      break;
    case "done":
      setBusy(false);
      $("download").disabled = false;
      // llama.cpp has no DoRA adapters, and Delta-LoRA moved the base too: merged only.
      $("download-gguf").disabled = ["dora", "delta-lora"].includes(state.method);
      $("download-merged").disabled = !state.model.name.endsWith(".gguf");
      status(`done after ${m.step} steps: validation loss ${state.val[0][1].toFixed(4)} → ${state.val[state.val.length - 1][1].toFixed(4)}`);
      document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
      break;
    case "adapter": {
      const save = (name, data, type) => {
        const a = document.createElement("a");
        a.href = URL.createObjectURL(new Blob([data], { type }));
        a.download = name;
        a.click();
      };
      save("adapter_config.json", m.config, "application/json");
      save("adapter_model.safetensors", m.bytes, "application/octet-stream");
      break;
    }
    case "gguf": {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([m.bytes], { type: "application/octet-stream" }));
      a.download = m.name;
      a.click();
      status(`${m.name}: ${(m.bytes.length / 1e6).toFixed(1)} MB` + (m.merged ? "" : " (llama.cpp: --lora; Ollama: ADAPTER)") +
        m.notes.map((n) => `; note: ${n}`).join(""));
      document.body.dataset.exportNotes = JSON.stringify(m.notes);
      break;
    }
    case "adapter-loaded":
      // A run continues the adapter with its own rank, alpha and targets.
      $("rank").value = String(m.adapter.r);
      if (m.adapter.alpha != null) $("alpha").value = String(m.adapter.alpha);
      $("targets").value = m.adapter.targets.join(",");
      $("adapter-desc").textContent = ` ${m.adapter.peft_type} r = ${m.adapter.r} on ${m.adapter.targets.join(",")}: the next run starts from it`;
      document.body.dataset.adapter = "1";
      break;
    case "error":
      error(m.message);
      document.body.dataset.error = m.message;
      break;
  }
};
worker.onerror = (e) => error(e.message || "the worker failed to start");

$("load-tiny").disabled = true;
$("load-tiny").onclick = async () => {
  error("");
  const get = async (f) => {
    const r = await fetch("models/tiny/" + f);
    if (!r.ok) throw new Error(`models/tiny/${f}: ${r.status}`);
    return r;
  };
  try {
    const config = await (await get("config.json")).text();
    const bytes = await (await get("model.safetensors")).arrayBuffer();
    const tokenizer = await (await get("tokenizer.json")).arrayBuffer();
    worker.postMessage({ cmd: "load", kind: "safetensors", name: "tiny GPT-2", config, bytes, tokenizer }, [bytes, tokenizer]);
  } catch (e) {
    error(e.message);
  }
};
$("model-file").onchange = async (ev) => {
  error("");
  const files = [...ev.target.files];
  const gguf = files.find((f) => f.name.endsWith(".gguf"));
  if (gguf) {
    const bytes = await gguf.arrayBuffer();
    worker.postMessage({ cmd: "load", kind: "gguf", name: gguf.name, bytes }, [bytes]);
    return;
  }
  const st = files.find((f) => f.name.endsWith(".safetensors"));
  const cfg = files.find((f) => f.name === "config.json");
  const tok = files.find((f) => f.name === "tokenizer.json");
  const tokCfg = files.find((f) => f.name === "tokenizer_config.json");
  if (!st || !cfg) {
    error("pick a .gguf file, or a model.safetensors with its config.json (and tokenizer.json, tokenizer_config.json)");
    return;
  }
  const bytes = await st.arrayBuffer();
  const tokenizer = tok ? await tok.arrayBuffer() : undefined;
  const tokenizerConfig = tokCfg ? await tokCfg.text() : undefined;
  worker.postMessage({ cmd: "load", kind: "safetensors", name: st.name, config: await cfg.text(), bytes, tokenizer, tokenizerConfig });
};
$("adapter-file").onchange = async (ev) => {
  error("");
  const files = [...ev.target.files];
  const gguf = files.find((f) => f.name.endsWith(".gguf"));
  if (gguf) {
    const bytes = await gguf.arrayBuffer();
    worker.postMessage({ cmd: "adapter-in-gguf", name: gguf.name, bytes }, [bytes]);
    return;
  }
  const cfg = files.find((f) => f.name.endsWith(".json"));
  const st = files.find((f) => f.name.endsWith(".safetensors"));
  if (!cfg || !st) {
    error("pick both adapter_config.json and adapter_model.safetensors, or a GGUF LoRA adapter (.gguf)");
    return;
  }
  const bytes = await st.arrayBuffer();
  worker.postMessage({ cmd: "adapter-in", config: await cfg.text(), bytes }, [bytes]);
};
// The run's defaults (the command line's, from the engine; rows no longer than the model's
// context) shown in the fields.
function showDefaults(d) {
  state.defaults = d;
  const set = (id, v) => { $(id).value = String(v); };
  set("rank", $("method").value === "vera" ? d.vera_rank : d.rank);
  set("alpha", d.alpha); set("lr", d.lr); set("batch", d.batch); set("seq", d.seq);
  set("eval-every", d.eval_every); set("lr-ratio", d.lr_ratio); set("delta-warmup", d.delta_warmup);
  set("sample-tokens", d.sample_tokens);
}
// Only the settings the method uses are shown (and sent: the engine refuses the others).
function showMethod() {
  const m = $("method").value;
  for (const el of document.querySelectorAll("[data-only-for]")) el.hidden = el.dataset.onlyFor !== m;
  for (const el of document.querySelectorAll("[data-unused-by]")) el.hidden = el.dataset.unusedBy === m;
  const d = state.defaults;
  // The rank follows the method's default unless it was changed by hand.
  if (d && [d.rank, d.vera_rank].includes(Number($("rank").value))) $("rank").value = m === "vera" ? d.vera_rank : d.rank;
}
$("method").onchange = showMethod;
showMethod();

// The first document as tokenized, its loss targets in <mark> (text set as text, never as HTML).
function showExample(runs) {
  const pre = $("example");
  pre.replaceChildren(...(runs || []).map(([text, target]) => {
    const el = document.createElement(target ? "mark" : "span");
    el.textContent = text;
    return el;
  }));
  $("example-box").hidden = !(runs && runs.length);
  document.body.dataset.exampleTargets = String((runs || []).filter(([, t]) => t).length);
}

$("text-file").onchange = async (ev) => {
  if (ev.target.files[0]) $("text").value = await ev.target.files[0].text();
};
$("train").onclick = () => {
  error("");
  state.train = [];
  state.val = [];
  draw();
  $("before").textContent = "";
  $("after").textContent = "";
  for (const id of ["download", "download-gguf", "download-merged"]) $(id).disabled = true;
  setBusy(true);
  const num = (id) => Number($(id).value);
  const method = $("method").value;
  state.method = method;
  const config = {
    method, rank: num("rank"), lr: num("lr"), steps: num("steps"), batch: num("batch"), seq: num("seq"),
    eval_every: num("eval-every"), targets: $("targets").value.split(",").map((s) => s.trim()).filter(Boolean),
    text: $("text").value, activations: $("activations").value,
  };
  if (method !== "vera") config.alpha = num("alpha");
  if (method === "lora-plus") config.lr_ratio = num("lr-ratio");
  if (method === "delta-lora") config.delta_warmup = num("delta-warmup");
  worker.postMessage({ cmd: "train", config, prompt: $("prompt").value, tokens: num("sample-tokens") });
};
$("pause").onclick = () => worker.postMessage({ cmd: "pause" });
$("stop").onclick = () => worker.postMessage({ cmd: "stop" });
$("download").onclick = () => worker.postMessage({ cmd: "export" });
const stem = () => (state.model ? state.model.name.replace(/\.gguf$/, "") : "model");
$("download-gguf").onclick = () => worker.postMessage({ cmd: "export-gguf", merged: false, name: `${stem()}-adapter.gguf` });
$("download-merged").onclick = () => worker.postMessage({ cmd: "export-gguf", merged: true, name: `${stem()}-merged.gguf` });
worker.postMessage({ cmd: "init" });
