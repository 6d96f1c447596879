//! The browser API (feature `web`, target wasm32): what `web/worker.js` calls, usable by any page
//! or app. One [`Engine`] holds the WebGPU device, a model, and an adapter being trained; its
//! methods take and return plain values and JSON strings so that JavaScript needs no glue.
//!
//! ```js
//! import init, { Engine } from "./pkg/portalora.js";
//! await init();
//! const engine = await Engine.create();            // rejects with a message without WebGPU
//! engine.loadGguf("SmolLM2.gguf", new Uint8Array(await file.arrayBuffer()));
//! const defaults = JSON.parse(engine.defaults());     // `portalora train`'s, seq within the context
//! engine.start(JSON.stringify({ targets: ["q_proj", "v_proj"], steps: 30, lr: 1e-3, text }));
//! let s;
//! do {
//!   s = JSON.parse(await engine.step());               // {step, loss, lr, tokens, seconds, evaluate, done}
//!   if (s.evaluate) console.log(s.step, await engine.eval());
//! } while (!s.done);
//! const [config, weights] = await engine.exportAdapter();  // PEFT's two files
//! const [gguf, notes] = await engine.exportGguf(false);    // a GGUF LoRA adapter for llama.cpp
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
use crate::data;
use crate::gpu::Context;
use crate::io::tokenizer::Tokenizer;
use crate::model::generate::{Generator, Sampling};
use crate::model::weights::{load_safetensors_bytes, Weights};
use crate::model::Arch;
use crate::run::{Plan, RunData, RunDefaults, RunState, DEFAULTS};
use crate::train::{Batch, TrainConfig, Trainer};

/// A Rust error (or a message) as a JavaScript one: its message, then each cause whose text the
/// message does not already hold, one a line, as the command line prints them.
fn err<'a>(e: impl Into<Box<dyn std::error::Error + 'a>>) -> JsError {
    let e = e.into();
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !message.contains(&cause) {
            message.push_str("\ncaused by: ");
            message.push_str(&cause);
        }
        source = s.source();
    }
    JsError::new(&message)
}

/// What the page asks for (`Engine::start`'s JSON): the command line's settings, by the same
/// names (its flags without dashes) and with the same defaults ([`crate::run::DEFAULTS`]). A
/// setting is `None` when not given.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartConfig {
    method: Option<String>,
    rank: Option<usize>,
    alpha: Option<f64>,
    /// Required unless an adapter was loaded (whose targets a run keeps).
    #[serde(default)]
    targets: Vec<String>,
    lr: Option<f64>,
    schedule: Option<String>,
    warmup_steps: Option<u64>,
    max_grad_norm: Option<f64>,
    batch: Option<usize>,
    grad_accum: Option<usize>,
    seq: Option<usize>,
    steps: Option<u64>,
    epochs: Option<f64>,
    val_fraction: Option<f64>,
    val_rows: Option<usize>,
    eval_every: Option<u64>,
    dropout: Option<f32>,
    lr_ratio: Option<f64>,
    seed: Option<u64>,
    delta_lambda: Option<f64>,
    delta_warmup: Option<u64>,
    /// Which tokens of a conversation are targets: "assistant" or "all".
    train_on: Option<crate::data::TrainOn>,
    /// One document per row, padded, instead of packing.
    #[serde(default)]
    no_packing: bool,
    /// Keep the rows in order instead of a seeded shuffle each epoch.
    #[serde(default)]
    no_shuffle: bool,
    /// Recompute the MLP's up-projections in backward instead of keeping them (less GPU memory).
    #[serde(default)]
    recompute_mlp: bool,
    /// "f16": keep the activations the backward pass reads as f16 (about half their memory),
    /// as `--activations f16`; "f32" (the default) otherwise.
    activations: Option<String>,
    text: String,
}

impl StartConfig {
    /// The method-specific settings given (for [`crate::run::unused_by_method`]).
    fn given(&self) -> Vec<&'static str> {
        let given = [
            (self.alpha.is_some(), "alpha"),
            (self.lr_ratio.is_some(), "lr_ratio"),
            (self.delta_lambda.is_some(), "delta_lambda"),
            (self.delta_warmup.is_some(), "delta_warmup"),
        ];
        given.into_iter().filter_map(|(g, n)| g.then_some(n)).collect()
    }
}

/// A run in the page: the trainer and the state it shares with the command line's runs.
struct Run {
    trainer: Trainer,
    state: RunState,
}

mod export;

struct Inner {
    ctx: Rc<Context>,
    weights: Option<Weights>,
    /// The GGUF file the model came from (a merged GGUF export copies its metadata and tensors).
    gguf: Option<crate::io::gguf::Gguf>,
    name: String,
    tok: Option<Tokenizer>,
    run: Option<Run>,
    /// An adapter to start from instead of a random init (`loadAdapter`).
    init: Option<PeftFile>,
    /// What the loaded model's files hold that the engine does not use (a vision tower, the
    /// model's own dropout): in its description and in each run's notes.
    model_notes: Vec<String>,
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
                gguf: None,
                name: String::new(),
                tok: None,
                run: None,
                init: None,
                model_notes: Vec::new(),
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
        let desc = self.set_model(name, w, tok, Vec::new())?;
        self.inner.borrow_mut().gguf = Some(g);
        Ok(desc)
    }

    /// Loads a Hugging Face model from `config.json`'s text, one `model.safetensors` file's bytes
    /// and, optionally, `tokenizer.json`'s bytes and `tokenizer_config.json`'s text (its chat
    /// template and end of sequence, as the command line reads a folder).
    #[wasm_bindgen(js_name = loadSafetensors)]
    pub fn load_safetensors(
        &self,
        name: &str,
        config: &str,
        weights: Vec<u8>,
        tokenizer: Option<Vec<u8>>,
        tokenizer_config: Option<String>,
    ) -> Result<String, JsError> {
        let _busy = Busy::take(&self.busy)?;
        let w = load_safetensors_bytes(name, config, &[&weights]).map_err(err)?;
        let tok = match (tokenizer, tokenizer_config) {
            (Some(b), cfg) => {
                let mut t = Tokenizer::from_json_bytes(Path::new(name), &b).map_err(err)?;
                if let Some(text) = cfg {
                    t.apply_tokenizer_config(Path::new("tokenizer_config.json"), &text).map_err(err)?;
                }
                Some(t)
            }
            (None, Some(_)) => return Err(err("tokenizer_config.json without tokenizer.json: give both, or neither")),
            (None, None) => None,
        };
        let notes = crate::model::model_dropout_note(config).into_iter().collect();
        self.set_model(name, w, tok, notes)
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

    /// The defaults of a run on the loaded model (those of the command line, rows no longer
    /// than the model's context; [`crate::run::RunDefaults`]), as JSON: the page shows them in
    /// its fields.
    pub fn defaults(&self) -> String {
        let g = self.inner.borrow();
        let d = match &g.weights {
            Some(w) => RunDefaults::for_model(&w.config),
            None => DEFAULTS,
        };
        serde_json::to_string(&d).unwrap_or_default()
    }

    /// Creates an adapter and its optimizer on the loaded model, and the run's rows from `text`
    /// (plain text, or JSONL in any of the command line's formats), made as `portalora train
    /// --data` makes them: packed, split into training and validation rows, read in a seeded
    /// order. `config` is JSON with the command line's settings by the same names and defaults
    /// (see `defaults`): `{"method", "rank", "alpha", "targets", "lr", "schedule",
    /// "warmup_steps", "max_grad_norm", "batch", "grad_accum", "seq", "steps" or "epochs",
    /// "val_fraction", "val_rows", "eval_every", "dropout", "lr_ratio", "seed", "delta_lambda",
    /// "delta_warmup", "train_on", "no_packing", "no_shuffle", "recompute_mlp", "activations", "text"}`; only
    /// "targets" (unless an adapter was loaded), "steps" (or "epochs") and "text" are required. A setting the method does not
    /// use is refused. Returns a JSON summary: the data, the run's shape and settings, the
    /// trainable parameters and the first example with its targets.
    pub fn start(&self, config: &str) -> Result<String, JsError> {
        let _busy = Busy::take(&self.busy)?;
        let c: StartConfig = serde_json::from_str(config).map_err(|e| err(format!("training settings: {e}")))?;
        let method: Method = c.method.as_deref().unwrap_or(DEFAULTS.method).parse().map_err(err)?;
        let unused = crate::run::unused_by_method(method, &c.given());
        if !unused.is_empty() {
            let list: Vec<String> = unused.iter().map(|(n, why)| format!("{n}: {why}")).collect();
            return Err(err(format!("this run would ignore {}; drop it", list.join("; "))));
        }
        let mut g = self.inner.borrow_mut();
        g.run = None; // free the previous run's buffers first
        let w = g.weights.as_ref().ok_or_else(|| err("load a model first"))?;
        let tok = g.tok.as_ref().ok_or_else(|| err("this model has no tokenizer; load one with the model"))?;
        let d = RunDefaults::for_model(&w.config);
        let (data, example) = run_data(&c, tok, &g.name, &d)?;
        let plan = Plan {
            batch: c.batch.unwrap_or(d.batch),
            grad_accum: c.grad_accum.unwrap_or(d.grad_accum),
            steps: c.steps,
            epochs: c.epochs,
            eval_every: c.eval_every.unwrap_or(d.eval_every),
            val_rows: c.val_rows.unwrap_or(d.val_rows),
            seed: c.seed.unwrap_or(d.seed),
            shuffle: !c.no_shuffle,
        };
        let state = RunState::new(data, &plan).map_err(err)?;
        let (acfg, tc) = run_configs(&c, method, &d, g.init.as_ref())?;
        let tc = crate::run::fit_length(&acfg, &tc, state.steps()).map_err(err)?;
        let ctx = g.ctx.clone();
        let trainer = Trainer::new(&ctx, w, state.batch(), state.seq(), &acfg, &tc, g.init.as_ref()).map_err(err)?;
        let s = state.summary.clone().unwrap_or_default();
        let out = serde_json::json!({
            "train_rows": s.train_rows, "val_rows": s.val_rows, "tokens": s.tokens,
            "targets": s.target_tokens, "conversations": s.conversations, "no_assistant": s.no_assistant,
            "trainable": trainer.trainable_parameters(), "kept_bytes": trainer.kept_bytes(),
            "example": example, "notes": run_notes(&state, &s, &g.model_notes),
            "settings": {
                "method": method.name(), "rank": acfg.rank, "alpha": acfg.alpha, "lr": tc.lr,
                "batch": state.batch(), "grad_accum": state.micro_batches(), "seq": state.seq(),
                "steps": state.steps(), "eval_every": plan.eval_every, "seed": plan.seed,
                "activations": if tc.activations_f16 { "f16" } else { "f32" },
            },
        })
        .to_string();
        g.run = Some(Run { trainer, state });
        Ok(out)
    }

    /// One optimizer step on the run's next rows. Resolves to JSON `{"step", "loss", "lr",
    /// "tokens", "seconds", "evaluate", "done"}`: `evaluate` when the run evaluates after this
    /// step (every "eval_every" steps and after the last), `done` after the last. A page pauses
    /// or stops training simply by not calling it again.
    pub fn step(&self) -> js_sys::Promise {
        let (inner, busy) = (self.inner.clone(), self.busy.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = Busy::take(&busy)?;
            let t0 = js_sys::Date::now();
            let mut g = inner.borrow_mut();
            let g = &mut *g;
            let run = g.run.as_mut().ok_or_else(|| err("start a run first"))?;
            if run.state.done() {
                let n = run.state.steps();
                return Err(err(format!("the run has taken its {n} steps; start a new one")).into());
            }
            let micro = run.state.next_step();
            let batches: Vec<Batch> = micro.iter().map(|m| m.batch()).collect();
            let st = run.trainer.train_step_async(&g.ctx, &batches).await.map_err(err)?;
            let seconds = (js_sys::Date::now() - t0) / 1000.0;
            let (evaluate, done) = (run.state.evaluates(run.state.step()), run.state.done());
            Ok(JsValue::from_str(
                &serde_json::json!({"step": st.step, "loss": st.loss, "lr": st.lr, "tokens": st.tokens,
                    "seconds": seconds, "evaluate": evaluate, "done": done})
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
            let run = g.run.as_ref().ok_or_else(|| err("start a run first"))?;
            let rows = run.state.val().ok_or_else(|| err("no validation rows: paste more text"))?;
            let v = run.trainer.eval_rows_async(&g.ctx, &rows.batch()).await.map_err(err)?;
            Ok(JsValue::from_f64(v))
        })
    }

    /// Greedy continuation of `prompt` by `max_tokens` tokens, with the adapter's branch when a
    /// run exists. Resolves to the new text.
    pub fn generate(&self, prompt: String, max_tokens: usize) -> js_sys::Promise {
        let (inner, busy) = (self.inner.clone(), self.busy.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = Busy::take(&busy)?;
            let g = inner.borrow();
            let w = g.weights.as_ref().ok_or_else(|| err("load a model first"))?;
            let tok = g.tok.as_ref().ok_or_else(|| err("this model has no tokenizer"))?;
            // With chat data, the prompt is a user message in the template, and the reply ends at
            // the template's end of turn.
            let mut stop: Vec<u32> = tok.eos_id.into_iter().collect();
            let ids = match g.run.as_ref().and_then(|r| r.state.chat.as_ref()) {
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
            let new = match g.run.as_ref().map(|r| &r.trainer) {
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
            let t = &g.run.as_ref().ok_or_else(|| err("start a run first"))?.trainer;
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
    fn set_model(&self, name: &str, w: Weights, tok: Option<Tokenizer>, notes: Vec<String>) -> Result<String, JsError> {
        let mut g = self.inner.borrow_mut();
        let c = &w.config;
        let notes: Vec<String> = w.left_out.iter().map(|l| l.to_string()).chain(notes).collect();
        let desc = serde_json::json!({
            "name": name, "arch": format!("{:?}", c.arch), "layers": c.num_layers, "hidden": c.hidden_size,
            "vocab": c.vocab_size, "parameters": c.num_parameters(), "tokenizer": tok.is_some(),
            "targets": crate::adapter::valid_targets(c.arch), "notes": notes,
        })
        .to_string();
        g.model_notes = notes;
        g.weights = Some(w);
        g.gguf = None;
        g.tok = tok;
        g.name = name.to_string();
        g.run = None;
        g.init = None;
        Ok(desc)
    }
}

/// A run's notes for the page: the model's, the data's keys not read, the run plan's.
fn run_notes(state: &RunState, s: &crate::data::DataSummary, model: &[String]) -> Vec<String> {
    let keys: Vec<String> = s.unread_keys.iter().map(|k| format!("{k:?}")).collect();
    let keys = (!keys.is_empty()).then(|| format!("keys of the text not read: {}", keys.join(", ")));
    model.iter().cloned().chain(keys).chain(s.notes.iter().cloned()).chain(state.notes().iter().cloned()).collect()
}

/// The run's rows from the page's text, made as `train --data` makes them, and the first
/// document as runs of text that are targets or not.
fn run_data(
    c: &StartConfig,
    tok: &Tokenizer,
    model: &str,
    d: &RunDefaults,
) -> Result<(RunData, Vec<(String, bool)>), JsError> {
    let given = data::chat_flags(None, c.train_on);
    let opts =
        data::ChatOptions { model, train_on: c.train_on.unwrap_or_default(), given: &given, ..Default::default() };
    let (docs, sources) = data::tokenized_text("the text", c.text.clone(), tok, &opts).map_err(err)?;
    let example = match docs.first() {
        Some(d) => data::target_runs(tok, d).map_err(err)?,
        None => Vec::new(),
    };
    let chat = match docs.iter().any(|d| d.chat) {
        true => tok.chat_template(None).map_err(err)?,
        false => None,
    };
    let packing = if c.no_packing { data::Packing::PerDocument } else { data::Packing::Packed };
    let (seq, val_fraction) = (c.seq.unwrap_or(d.seq), c.val_fraction.unwrap_or(d.val_fraction));
    let seed = c.seed.unwrap_or(d.seed);
    let ds = data::dataset(Path::new("the text"), docs, sources, packing, seq, val_fraction, seed, tok).map_err(err)?;
    Ok((RunData { train: ds.train, val: ds.val, chat, summary: Some(ds.summary), fixed: false }, example))
}

/// The adapter's and the optimizer's settings: given, or the defaults; an adapter loaded with
/// `loadAdapter` fixes its rank, alpha and targets.
fn run_configs(
    c: &StartConfig,
    method: Method,
    d: &RunDefaults,
    init: Option<&PeftFile>,
) -> Result<(AdapterConfig, TrainConfig), JsError> {
    let mut acfg = AdapterConfig {
        rank: c.rank.unwrap_or(d.rank_of(method)),
        alpha: c.alpha.unwrap_or(d.alpha),
        dropout: c.dropout.unwrap_or(d.dropout),
        targets: c.targets.clone(),
        seed: c.seed.unwrap_or(d.seed),
        delta_lambda: c.delta_lambda.unwrap_or(d.delta_lambda),
        delta_warmup: c.delta_warmup.unwrap_or(d.delta_warmup),
        ..AdapterConfig::new(method)
    };
    if let Some(f) = init {
        let from_file = f.adapter_config(method, &acfg).map_err(err)?;
        check_init(c, &from_file)?;
        acfg = from_file;
        // A dropout given replaces the file's lora_dropout, as --dropout does; Delta-LoRA has none.
        match c.dropout {
            Some(d) => acfg.dropout = d,
            None if method == Method::DeltaLora => acfg.dropout = 0.0,
            None => {}
        }
    }
    let tc = TrainConfig {
        lr: c.lr.unwrap_or(d.lr),
        lr_ratio: c.lr_ratio.unwrap_or(d.lr_ratio),
        schedule: c.schedule.as_deref().unwrap_or(d.schedule).parse().map_err(err)?,
        warmup_steps: c.warmup_steps.unwrap_or(d.warmup_steps),
        max_grad_norm: c.max_grad_norm.unwrap_or(d.max_grad_norm),
        grad_accum: c.grad_accum.unwrap_or(d.grad_accum),
        // As stored (the page samples with the adapter unmerged); Delta-LoRA gets f32.
        base_dtype: crate::model::BaseDType::Auto,
        recompute_mlp: c.recompute_mlp,
        lora_plus: method == Method::Dora && c.lr_ratio.is_some(),
        activations_f16: match c.activations.as_deref() {
            None | Some("f32") => false,
            Some("f16") => true,
            Some(other) => return Err(err(format!("activations {other:?}: use \"f32\" or \"f16\""))),
        },
        ..TrainConfig::default()
    };
    Ok((acfg, tc))
}

/// A loaded adapter fixes its rank, alpha and targets: settings that say otherwise are refused,
/// as `--init-adapter` refuses them, rather than ignored.
fn check_init(c: &StartConfig, file: &AdapterConfig) -> Result<(), JsError> {
    let mut differ = Vec::new();
    if let Some(r) = c.rank.filter(|&r| r != file.rank) {
        differ.push(format!("rank {r} (its r = {})", file.rank));
    }
    if let Some(a) = c.alpha.filter(|&a| (a - file.alpha).abs() > 1e-12 * file.alpha.abs().max(1.0)) {
        differ.push(format!("alpha {a} (its lora_alpha = {})", file.alpha));
    }
    let sorted = |t: &[String]| {
        let mut t = t.to_vec();
        t.sort();
        t
    };
    if !c.targets.is_empty() && sorted(&c.targets) != sorted(&file.targets) {
        differ.push(format!("targets {} (its target_modules {})", c.targets.join(","), file.targets.join(",")));
    }
    match differ.is_empty() {
        true => Ok(()),
        false => Err(err(format!(
            "the loaded adapter disagrees with {}: a run continues an adapter with its own settings; use its \
             values, or load the model again to start afresh",
            differ.join(", ")
        ))),
    }
}
