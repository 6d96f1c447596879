//! The browser API (feature `web`, target wasm32): what `web/worker.js` calls, usable by any page
//! or app. One [`Engine`] holds the WebGPU device, a model, and an adapter being trained; its
//! methods take and return plain values and JSON strings so that JavaScript needs no glue.
//!
//! ```js
//! import init, { Engine } from "./pkg/portalora.js";
//! await init();
//! const engine = await Engine.create();            // rejects with a message without WebGPU
//! engine.loadGguf("SmolLM2.gguf", new Uint8Array(await file.arrayBuffer()));
//! engine.start(JSON.stringify({ method: "lora", rank: 8, alpha: 16, targets: ["q_proj", "v_proj"],
//!                               lr: 1e-3, batch: 2, seq: 64, text }));
//! const { step, loss, tokens_per_s } = JSON.parse(await engine.step());
//! const [config, weights] = await engine.exportAdapter();  // PEFT's two files
//! ```
//!
//! Calls are meant to be made one at a time (a worker awaiting each): a method called while
//! another is still running is refused with a message.

// The cell's borrow is held across awaits on purpose: `Busy` keeps calls from overlapping.
#![allow(clippy::await_holding_refcell_ref)]

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;

use serde::Deserialize;
use wasm_bindgen::prelude::*;

use crate::adapter::peft::{config_json, export, safetensors_bytes, PeftFile};
use crate::adapter::{AdapterConfig, Method};
use crate::data::{self, Row};
use crate::gpu::Context;
use crate::io::tokenizer::Tokenizer;
use crate::model::generate::{Generator, Sampling};
use crate::model::weights::{load_safetensors_bytes, Weights};
use crate::model::Arch;
use crate::train::{Batch, Schedule, TrainConfig, Trainer};

fn err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// What the page asks for (`Engine::start`'s JSON).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartConfig {
    method: String,
    #[serde(default = "d_rank")]
    rank: usize,
    #[serde(default = "d_alpha")]
    alpha: f64,
    targets: Vec<String>,
    #[serde(default = "d_lr")]
    lr: f64,
    #[serde(default = "d_batch")]
    batch: usize,
    #[serde(default = "d_seq")]
    seq: usize,
    #[serde(default)]
    steps: u64,
    #[serde(default)]
    dropout: f32,
    #[serde(default = "d_ratio")]
    lr_ratio: f64,
    #[serde(default)]
    seed: u64,
    /// Delta-LoRA's λ and warm-up K (0 here: a browser run is short).
    #[serde(default = "d_lambda")]
    delta_lambda: f64,
    #[serde(default)]
    delta_warmup: u64,
    /// Recompute the MLP's up-projections in backward instead of keeping them (less GPU memory).
    #[serde(default)]
    recompute_mlp: bool,
    text: String,
}
fn d_lambda() -> f64 {
    2.0
}
fn d_rank() -> usize {
    8
}
fn d_alpha() -> f64 {
    16.0
}
fn d_lr() -> f64 {
    1e-3
}
fn d_batch() -> usize {
    2
}
fn d_seq() -> usize {
    64
}
fn d_ratio() -> f64 {
    16.0
}

struct Inner {
    ctx: Rc<Context>,
    weights: Option<Weights>,
    name: String,
    tok: Option<Tokenizer>,
    trainer: Option<Trainer>,
    train: Vec<Row>,
    val: Vec<Row>,
    rows_read: usize,
    /// An adapter to start from instead of a random init (`loadAdapter`).
    init: Option<PeftFile>,
    /// The chat template, when the data holds conversations (prompts are sampled in it).
    chat: Option<crate::io::chat::ChatTemplate>,
}

/// The engine a page talks to.
#[wasm_bindgen]
pub struct Engine {
    inner: Rc<RefCell<Inner>>,
    busy: Rc<Cell<bool>>,
}

/// Marks the engine busy for the duration of one call. The flag lives outside the `RefCell`, so
/// a second call while one is awaiting is refused with a message instead of finding the cell
/// borrowed; this is also why holding the borrow across an await is sound here.
struct Busy(Rc<Cell<bool>>);
impl Busy {
    fn take(busy: &Rc<Cell<bool>>) -> Result<Busy, JsError> {
        if busy.replace(true) {
            return Err(err("the engine is busy with another call; await it first"));
        }
        Ok(Busy(busy.clone()))
    }
}
impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

#[wasm_bindgen]
impl Engine {
    /// Opens the browser's WebGPU adapter. Rejects with a readable message when the browser has
    /// no WebGPU (or it is disabled).
    pub async fn create() -> Result<Engine, JsError> {
        let ctx = Context::new().await.map_err(|_| {
            err("this browser offers no WebGPU adapter: use a recent Chrome, Edge or Safari with WebGPU enabled \
                 (Chromium on Linux: start it with --enable-unsafe-webgpu)")
        })?;
        Ok(Engine {
            inner: Rc::new(RefCell::new(Inner {
                ctx: Rc::new(ctx),
                weights: None,
                name: String::new(),
                tok: None,
                trainer: None,
                train: Vec::new(),
                val: Vec::new(),
                rows_read: 0,
                init: None,
                chat: None,
            })),
            busy: Rc::new(Cell::new(false)),
        })
    }

    /// The adapter, its features and limits, as JSON.
    pub fn info(&self) -> String {
        let g = self.inner.borrow();
        let (i, f, l) = (g.ctx.info(), g.ctx.features(), g.ctx.limits());
        serde_json::json!({
            "name": i.name, "backend": i.backend, "device_type": i.device_type, "subgroups": f.subgroups,
            "subgroup_min_size": i.subgroup_min_size, "shader_f16": f.shader_f16,
            "max_storage_binding": l.max_storage_binding, "max_buffer": l.max_buffer,
        })
        .to_string()
    }

    /// Loads a GGUF file's bytes (the model and its tokenizer). Returns a JSON description.
    #[wasm_bindgen(js_name = loadGguf)]
    pub fn load_gguf(&self, name: &str, bytes: Vec<u8>) -> Result<String, JsError> {
        let _busy = Busy::take(&self.busy)?;
        let g = crate::io::gguf::Gguf::from_bytes(name, bytes).map_err(err)?;
        let tok = Tokenizer::from_gguf(&g).ok();
        // The file's packed bytes stay: the base is kept as stored on the GPU where subgroups exist.
        let w = crate::model::weights::weights_from_gguf(&g).map_err(err)?;
        drop(g);
        self.set_model(name, w, tok)
    }

    /// Loads a Hugging Face model from `config.json`'s text, one `model.safetensors` file's bytes
    /// and, optionally, `tokenizer.json`'s bytes.
    #[wasm_bindgen(js_name = loadSafetensors)]
    pub fn load_safetensors(
        &self,
        name: &str,
        config: &str,
        weights: Vec<u8>,
        tokenizer: Option<Vec<u8>>,
    ) -> Result<String, JsError> {
        let _busy = Busy::take(&self.busy)?;
        let w = load_safetensors_bytes(name, config, &[&weights]).map_err(err)?;
        let tok = match tokenizer {
            Some(b) => Some(Tokenizer::from_json_bytes(Path::new(name), &b).map_err(err)?),
            None => None,
        };
        self.set_model(name, w, tok)
    }
}

#[wasm_bindgen]
impl Engine {
    /// Loads a PEFT adapter (`adapter_config.json`'s text and `adapter_model.safetensors`'
    /// bytes, written by portalora or by PEFT) for the next `start`: training then continues from
    /// it, with its rank, alpha and targets. Returns a JSON description.
    #[wasm_bindgen(js_name = loadAdapter)]
    pub fn load_adapter(&self, config: &str, weights: Vec<u8>) -> Result<String, JsError> {
        let _busy = Busy::take(&self.busy)?;
        let f = PeftFile::from_bytes(Path::new("adapter"), config, &weights).map_err(err)?;
        let desc = serde_json::json!({"peft_type": f.peft_type, "r": f.rank, "alpha": f.alpha, "targets": f.targets})
            .to_string();
        self.inner.borrow_mut().init = Some(f);
        Ok(desc)
    }

    /// Creates an adapter and its optimizer on the loaded model and packs `text` into rows for
    /// training (90%) and validation (10%). `config` is JSON: `{"method", "rank", "alpha",
    /// "targets", "lr", "batch", "seq", "steps" (for the schedule; 0: constant), "dropout",
    /// "lr_ratio", "seed", "delta_lambda", "delta_warmup" (default 0), "text"}`. Returns a JSON summary (data, trainable parameters).
    pub fn start(&self, config: &str) -> Result<String, JsError> {
        let _busy = Busy::take(&self.busy)?;
        let c: StartConfig = serde_json::from_str(config).map_err(|e| err(format!("training settings: {e}")))?;
        let method: Method = c.method.parse().map_err(err)?;
        let mut g = self.inner.borrow_mut();
        g.trainer = None; // free the previous run's buffers first
        let w = g.weights.as_ref().ok_or_else(|| err("load a model first"))?;
        let tok = g.tok.as_ref().ok_or_else(|| err("this model has no tokenizer; load one with the model"))?;
        // Text, or JSONL in any of the command line's formats (conversations in the model's chat
        // template, the loss on the assistant's turns), packed as `train --data` packs it.
        let opts = data::ChatOptions { model: &g.name, ..Default::default() };
        let docs = data::tokenized_text("the text", c.text.clone(), tok, &opts).map_err(err)?;
        let example = match docs.first() {
            Some(d) => data::target_runs(tok, d).map_err(err)?,
            None => Vec::new(),
        };
        let chat = match docs.iter().any(|d| d.chat) {
            true => tok.chat_template(None).map_err(err)?,
            false => None,
        };
        let summary = data::DataSummary { files: 1, seq: c.seq, ..Default::default() };
        let (rows, summary) = data::rows_of(docs, data::Packing::Packed, c.seq, tok.eos_id.unwrap_or(0), summary);
        let ds = data::split(rows, 0.1, c.seed, summary);
        if ds.train.len() < c.batch.max(1) {
            return Err(err(format!(
                "the text makes {} training rows of {} tokens; a batch needs {}: paste more text or lower the sequence length",
                ds.train.len(),
                c.seq,
                c.batch
            )));
        }
        let mut acfg = AdapterConfig {
            rank: c.rank,
            alpha: c.alpha,
            dropout: c.dropout,
            targets: c.targets.clone(),
            seed: c.seed,
            delta_lambda: c.delta_lambda,
            delta_warmup: c.delta_warmup,
            ..AdapterConfig::new(method)
        };
        if let Some(f) = &g.init {
            acfg = f.adapter_config(method, &acfg).map_err(err)?;
        }
        let tc = TrainConfig {
            lr: c.lr,
            lr_ratio: c.lr_ratio,
            schedule: if c.steps > 0 { Schedule::Cosine } else { Schedule::Constant },
            total_steps: c.steps.max(1),
            // As stored (the page samples with the adapter unmerged); Delta-LoRA gets f32.
            base_dtype: crate::model::BaseDType::Auto,
            recompute_mlp: c.recompute_mlp,
            ..TrainConfig::default()
        };
        let ctx = g.ctx.clone();
        let trainer = Trainer::new(&ctx, w, c.batch, c.seq, &acfg, &tc, g.init.as_ref()).map_err(err)?;
        let out = serde_json::json!({
            "train_rows": ds.train.len(), "val_rows": ds.val.len(), "tokens": ds.summary.tokens,
            "targets": ds.summary.target_tokens, "conversations": ds.summary.conversations,
            "trainable": trainer.trainable_parameters(), "kept_bytes": trainer.kept_bytes(),
            "example": example,
        })
        .to_string();
        g.chat = chat;
        g.trainer = Some(trainer);
        g.train = ds.train;
        g.val = ds.val;
        g.rows_read = 0;
        Ok(out)
    }

    /// One optimizer step on the next rows. Resolves to JSON `{"step", "loss", "lr", "tokens",
    /// "seconds"}`; a page pauses or stops training simply by not calling it again.
    pub fn step(&self) -> js_sys::Promise {
        let (inner, busy) = (self.inner.clone(), self.busy.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = Busy::take(&busy)?;
            let t0 = js_sys::Date::now();
            let mut g = inner.borrow_mut();
            let g = &mut *g;
            let trainer = g.trainer.as_mut().ok_or_else(|| err("start a run first"))?;
            let b = trainer.model.acts.batch;
            let n = g.train.len();
            let picked: Vec<&Row> = (0..b).map(|i| &g.train[(g.rows_read + i) % n]).collect();
            let rows: Vec<Vec<u32>> = picked.iter().map(|r| r.ids.clone()).collect();
            let masks: Vec<Vec<bool>> = picked.iter().map(|r| r.predict.clone()).collect();
            let pos: Vec<Vec<u32>> = picked.iter().map(|r| r.pos.clone()).collect();
            g.rows_read += b;
            let batch = Batch { ids: &rows, predict: Some(&masks), positions: Some(&pos) };
            let st = trainer.train_step_async(&g.ctx, &[batch]).await.map_err(err)?;
            let seconds = (js_sys::Date::now() - t0) / 1000.0;
            Ok(JsValue::from_str(
                &serde_json::json!({"step": st.step, "loss": st.loss, "lr": st.lr, "tokens": st.tokens, "seconds": seconds})
                    .to_string(),
            ))
        })
    }

    /// The mean loss on the validation rows (resolves to a number).
    pub fn eval(&self) -> js_sys::Promise {
        let (inner, busy) = (self.inner.clone(), self.busy.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = Busy::take(&busy)?;
            let g = inner.borrow();
            let trainer = g.trainer.as_ref().ok_or_else(|| err("start a run first"))?;
            let rows: Vec<Vec<u32>> = g.val.iter().map(|r| r.ids.clone()).collect();
            if rows.is_empty() {
                return Err(err("no validation rows: paste more text").into());
            }
            let masks: Vec<Vec<bool>> = g.val.iter().map(|r| r.predict.clone()).collect();
            let pos: Vec<Vec<u32>> = g.val.iter().map(|r| r.pos.clone()).collect();
            let batch = Batch { ids: &rows, predict: Some(&masks), positions: Some(&pos) };
            let v = trainer.eval_rows_async(&g.ctx, &batch).await.map_err(err)?;
            Ok(JsValue::from_f64(v))
        })
    }

    /// Greedy continuation of `prompt` by `max_tokens` tokens, with the adapter's branch when a
    /// run exists. Resolves to the new text.
    pub fn generate(&self, prompt: String, max_tokens: usize) -> js_sys::Promise {
        let (inner, busy) = (self.inner.clone(), self.busy.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = Busy::take(&busy)?;
            let mut g = inner.borrow_mut();
            let g = &mut *g;
            let w = g.weights.as_ref().ok_or_else(|| err("load a model first"))?;
            let tok = g.tok.as_ref().ok_or_else(|| err("this model has no tokenizer"))?;
            // With chat data, the prompt is a user message in the template, and the reply ends at
            // the template's end of turn.
            let mut stop: Vec<u32> = tok.eos_id.into_iter().collect();
            let ids = match &g.chat {
                Some(t) => {
                    let text = t.render(&[crate::io::chat::Message::new("user", &prompt)], true).map_err(err)?;
                    stop.extend(tok.encode(&t.end_of_turn().map_err(err)?).map_err(err)?.first());
                    tok.encode_with_offsets(&text).map_err(err)?.0
                }
                None => tok.encode_text(&prompt).map_err(err)?,
            };
            if ids.is_empty() {
                return Err(err("the prompt is empty").into());
            }
            let ctx = g.ctx.clone();
            let max_len = (ids.len() + max_tokens).min(w.config.usable_positions());
            let sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
            let new = match g.trainer.as_ref() {
                Some(t) => {
                    // The adapter's branch beside the frozen weights, unmerged.
                    let mut gen = Generator::new(&ctx, &w.config, &t.model.params, max_len).map_err(err)?;
                    if let Some(a) = t.model.adapter() {
                        gen = gen.with_adapter(a).map_err(err)?;
                    }
                    gen.generate_async(&ctx, &ids, max_tokens, sampling, &stop, |_| {}).await.map_err(err)?
                }
                None => {
                    let params = crate::model::gpu::ParameterTensors::upload(&ctx, w).map_err(err)?;
                    let mut gen = Generator::new(&ctx, &w.config, &params, max_len).map_err(err)?;
                    gen.generate_async(&ctx, &ids, max_tokens, sampling, &stop, |_| {}).await.map_err(err)?
                }
            };
            Ok(JsValue::from_str(&tok.decode_text(&new).map_err(err)?))
        })
    }

    /// The adapter as PEFT's two files: resolves to `[adapter_config.json text,
    /// adapter_model.safetensors bytes]`.
    #[wasm_bindgen(js_name = exportAdapter)]
    pub fn export_adapter(&self) -> js_sys::Promise {
        let (inner, busy) = (self.inner.clone(), self.busy.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = Busy::take(&busy)?;
            let g = inner.borrow();
            let t = g.trainer.as_ref().ok_or_else(|| err("start a run first"))?;
            let tensors = export(&g.ctx, t.adapter()).await.map_err(err)?;
            let bytes = safetensors_bytes(&tensors).map_err(err)?;
            let gpt2 = t.model.config.arch == Arch::Gpt2;
            let cfg = serde_json::to_string_pretty(&config_json(t.adapter().config(), gpt2, None)).map_err(err)?;
            let out = js_sys::Array::new();
            out.push(&JsValue::from_str(&cfg));
            out.push(&js_sys::Uint8Array::from(bytes.as_slice()));
            Ok(out.into())
        })
    }
}

impl Engine {
    fn set_model(&self, name: &str, w: Weights, tok: Option<Tokenizer>) -> Result<String, JsError> {
        let mut g = self.inner.borrow_mut();
        let c = &w.config;
        let desc = serde_json::json!({
            "name": name, "arch": format!("{:?}", c.arch), "layers": c.num_layers, "hidden": c.hidden_size,
            "vocab": c.vocab_size, "parameters": c.num_parameters(), "tokenizer": tok.is_some(),
            "targets": crate::adapter::valid_targets(c.arch),
        })
        .to_string();
        g.weights = Some(w);
        g.tok = tok;
        g.name = name.to_string();
        g.trainer = None;
        g.init = None;
        Ok(desc)
    }
}
