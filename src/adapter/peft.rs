//! PEFT's adapter files: `adapter_config.json` + `adapter_model.safetensors` (metadata
//! `{"format": "pt"}`), keys `base_model.model.<module>.lora_A.weight` `(r, in)` and
//! `...lora_B.weight` `(out, r)`; VeRA: `...<module>.vera_lambda_b` `(out,)`, `...vera_lambda_d`
//! `(r,)` and the shared `base_model.vera_A` / `base_model.vera_B`.
//!
//! Files are written to temporary names and renamed, so a folder never holds a half-written file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{Adapter, AdapterConfig, AdapterError, Method, Result};
use crate::gpu::Context;
use crate::model::weights::{read_safetensors_bytes, HostTensor};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// An adapter folder read from disk.
#[derive(Debug)]
pub struct PeftFile {
    pub dir: PathBuf,
    pub config: Value,
    /// "LORA" or "VERA".
    pub peft_type: String,
    pub rank: usize,
    /// LoRA's lora_alpha (None for VeRA).
    pub alpha: Option<f64>,
    pub rslora: bool,
    pub targets: Vec<String>,
    /// `target_modules` given as a regular expression (a string) rather than a list.
    pub target_regex: Option<String>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    /// `layers_to_transform`.
    pub layers: Option<Vec<usize>>,
    pub dropout: f32,
    /// PEFT's `use_dora`: a DoRA adapter (its `lora_magnitude_vector`s with A and B).
    pub use_dora: bool,
    pub tensors: BTreeMap<String, HostTensor>,
    /// Modules whose B rows are in llama.cpp's rotary order (a GGUF LoRA file's LLaMA q/k; see
    /// [`PeftFile::tensors_for`]).
    pub rotary: Vec<String>,
}

/// The method a portalora run trained the adapter in `dir` with, as the run's `run.json` says:
/// beside it (a run's `OUT`) or one folder up (Delta-LoRA's `OUT/adapter`, a run's
/// `OUT/checkpoint`). `None` for an adapter from elsewhere.
pub fn run_method(dir: &Path) -> Option<Method> {
    [dir.join("run.json"), dir.join("../run.json")].into_iter().find_map(|p| {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["adapter"]["method"].as_str()?.parse().ok()
    })
}

/// Refuses a Delta-LoRA run's adapter where it would be applied to a base on its own (eval,
/// generate, merge, `--init-adapter`): Delta-LoRA also moved the base's weights, so its A and B
/// on the base do not reproduce the fine-tune, and on the run's merged model they would count
/// twice. Its file says only "LORA"; the run's `run.json` tells.
pub fn refuse_delta_lora_alone(dir: &Path) -> Result<()> {
    if run_method(dir) != Some(Method::DeltaLora) {
        return Ok(());
    }
    let run = if dir.join("run.json").exists() { dir.to_path_buf() } else { dir.join("..") };
    let run = std::fs::canonicalize(&run).unwrap_or(run);
    Err(file_err(
        dir,
        format!(
            "is a Delta-LoRA run's adapter: Delta-LoRA also moved the base weights, so this adapter on a \
             base does not reproduce the fine-tune (and on the run's merged model it would be added twice); \
             use the merged model {} as --model without it, or continue the run with \
             `portalora train --resume {}`",
            run.display(),
            run.display()
        ),
    ))
}

fn file_err(path: &Path, message: impl Into<String>) -> AdapterError {
    AdapterError::File { path: path.display().to_string(), message: message.into() }
}

impl PeftFile {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`, or a GGUF LoRA
    /// adapter file (see `peft_gguf`).
    pub fn read(dir: &Path) -> Result<PeftFile> {
        if dir.is_file() {
            let mut magic = [0u8; 4];
            let is_gguf =
                std::fs::File::open(dir).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
                    && &magic == b"GGUF";
            if !is_gguf {
                return Err(file_err(
                    dir,
                    "is a file but not a GGUF LoRA adapter; an adapter is a folder (adapter_config.json and \
                     adapter_model.safetensors) or a .gguf file from `portalora export`",
                ));
            }
            let g = crate::io::gguf::Gguf::open(dir)?;
            return Self::from_gguf(&g);
        }
        if !dir.exists() {
            return Err(file_err(dir, "no such file or folder"));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|source| AdapterError::Io { path: cfg_path.display().to_string(), source })?;
        let st_path = dir.join(WEIGHTS_FILE);
        if !st_path.exists() {
            return Err(file_err(
                &st_path,
                "missing; an adapter folder holds adapter_config.json and adapter_model.safetensors",
            ));
        }
        let bytes = std::fs::read(&st_path)
            .map_err(|source| AdapterError::Io { path: st_path.display().to_string(), source })?;
        Self::from_bytes(dir, &text, &bytes)
    }

    /// Parses an adapter from the text of its `adapter_config.json` and the bytes of its
    /// `adapter_model.safetensors` (`dir` names the folder in messages).
    pub fn from_bytes(dir: &Path, text: &str, safetensors: &[u8]) -> Result<PeftFile> {
        let cfg_path = dir.join(CONFIG_FILE);
        let config: Value = serde_json::from_str(text)
            .map_err(|source| AdapterError::Json { path: cfg_path.display().to_string(), source })?;
        let peft_type = config["peft_type"].as_str().unwrap_or("").to_ascii_uppercase();
        if peft_type != "LORA" && peft_type != "VERA" {
            return Err(file_err(
                &cfg_path,
                format!("peft_type {:?} is not supported; portalora reads LORA and VERA adapters", config["peft_type"]),
            ));
        }
        refuse_unsupported(&config).map_err(|m| file_err(&cfg_path, m))?;
        let rank = config["r"]
            .as_f64()
            .filter(|r| *r >= 1.0 && r.fract() == 0.0)
            .ok_or_else(|| file_err(&cfg_path, format!("\"r\" = {} is not a positive integer", config["r"])))?
            as usize;
        let alpha = if peft_type == "LORA" { Some(config["lora_alpha"].as_f64().unwrap_or(8.0)) } else { None };
        let (targets, target_regex) = match &config["target_modules"] {
            Value::Array(a) => (a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(), None),
            // PEFT matches a string against whole module names, as a regular expression.
            Value::String(s) if s.eq_ignore_ascii_case("all-linear") => (vec![ALL_LINEAR.to_string()], None),
            Value::String(s) => (Vec::new(), Some(s.clone())),
            _ => (Vec::new(), None),
        };
        let rank_pattern = read_pattern(&config, &cfg_path, "rank_pattern")?
            .into_iter()
            .map(|(p, r)| match r >= 1.0 && r.fract() == 0.0 {
                true => Ok((p, r as usize)),
                false => Err(file_err(&cfg_path, format!("rank_pattern {p:?}: rank {r} is not a positive integer"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = read_pattern(&config, &cfg_path, "alpha_pattern")?;
        let layers = read_layers(&config, &cfg_path)?;
        let dropout_key = if peft_type == "LORA" { "lora_dropout" } else { "vera_dropout" };
        let mut raw = BTreeMap::new();
        let st_path = dir.join(WEIGHTS_FILE);
        read_safetensors_bytes(&st_path, safetensors, &mut raw)?;
        // Files written with an adapter name inside the keys (".default.") mean the same tensors.
        let tensors = raw.into_iter().map(|(k, v)| (k.replace(".default.", ".").replace(".default", ""), v)).collect();
        Ok(PeftFile {
            dir: dir.to_path_buf(),
            rank,
            alpha,
            rslora: config["use_rslora"].as_bool().unwrap_or(false),
            targets,
            target_regex,
            rank_pattern,
            alpha_pattern,
            layers,
            dropout: config[dropout_key].as_f64().unwrap_or(0.0) as f32,
            use_dora: config["use_dora"].as_bool().unwrap_or(false),
            peft_type,
            config,
            tensors,
            rotary: Vec::new(),
        })
    }

    /// The method these files were trained with, as far as they say: VeRA, DoRA, or LoRA (which
    /// LoRA-FA, LoRA+ and Delta-LoRA also write).
    pub fn method(&self) -> Method {
        match (self.peft_type.as_str(), self.use_dora) {
            ("VERA", _) => Method::Vera,
            (_, true) => Method::Dora,
            _ => Method::Lora,
        }
    }

    /// An adapter config for these files: `method` (LoRA files may serve LoRA, LoRA-FA, LoRA+ and
    /// Delta-LoRA) with the file's rank, alpha, rsLoRA, targets and dropout, the rest from `base`.
    pub fn adapter_config(&self, method: Method, base: &AdapterConfig) -> Result<AdapterConfig> {
        let is_vera = self.peft_type == "VERA";
        if is_vera != (method == Method::Vera) {
            return Err(file_err(
                &self.dir,
                format!("holds a {} adapter, which method {method} cannot use", self.peft_type),
            ));
        }
        if self.use_dora != (method == Method::Dora) {
            let (held, want) = match self.use_dora {
                true => ("a DoRA adapter (use_dora, with magnitude vectors)", "use method dora"),
                false => ("a plain LoRA adapter (no magnitude vectors)", "DoRA needs a file PEFT wrote with use_dora"),
            };
            return Err(file_err(&self.dir, format!("holds {held}, which method {method} cannot use: {want}")));
        }
        let mut cfg = base.clone();
        cfg.method = method;
        cfg.rank = self.rank;
        if let Some(a) = self.alpha {
            cfg.alpha = a;
        }
        cfg.rslora = self.rslora;
        cfg.targets = self.targets.clone();
        cfg.target_regex = self.target_regex.clone();
        cfg.rank_pattern = self.rank_pattern.clone();
        cfg.alpha_pattern = self.alpha_pattern.clone();
        cfg.layers = self.layers.clone();
        cfg.dropout = self.dropout;
        if let Some(d) = self.config["d_initial"].as_f64() {
            cfg.vera_d_initial = d;
        }
        if let Some(k) = self.config["projection_prng_key"].as_u64() {
            cfg.vera_seed = k;
        }
        Ok(cfg)
    }

    /// `r`, or its error as "this adapter does not fit the base model `model`" (the cause kept).
    pub fn fits<T>(&self, model: &Path, r: Result<T>) -> Result<T> {
        r.map_err(|e| AdapterError::Mismatch {
            adapter: self.dir.display().to_string(),
            model: model.display().to_string(),
            source: Box::new(e),
        })
    }

    /// Writes these tensors into `adapter` on `model`, checking every name and shape first.
    pub fn load_into(&self, ctx: &Context, adapter: &mut dyn Adapter, model: &crate::model::ModelConfig) -> Result<()> {
        let tensors = self.tensors_for(model);
        // Messages name the file the tensors came from: a GGUF file, or the folder's safetensors.
        let gguf = self.dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let st_path = if gguf { self.dir.clone() } else { self.dir.join(WEIGHTS_FILE) };
        let slots = adapter.slots();
        let wanted: Vec<&str> = slots.iter().map(|s| s.key.as_str()).collect();
        if let Some(extra) = tensors.keys().find(|k| !wanted.contains(&k.as_str())) {
            return Err(file_err(
                &st_path,
                format!(
                    "tensor {extra:?} does not belong to an adapter on this model's targets ({}); \
                     check the base model and target_modules",
                    adapter.config().targets.join(", ")
                ),
            ));
        }
        for slot in &slots {
            let t = tensors.get(&slot.key).ok_or_else(|| {
                file_err(&st_path, format!("tensor {:?} is missing; the adapter and the model do not fit", slot.key))
            })?;
            if t.shape != slot.shape {
                return Err(file_err(
                    &st_path,
                    format!(
                        "tensor {:?} has shape {:?} but this model needs {:?}; was it trained on another base model?",
                        slot.key, t.shape, slot.shape
                    ),
                ));
            }
        }
        for slot in &slots {
            let t = &tensors[&slot.key];
            let mut at = 0;
            for part in &slot.parts {
                let n = part.numel();
                ctx.write_f32(part, &t.data[at..at + n])?;
                at += n;
            }
        }
        drop(slots);
        adapter.loaded(ctx, &tensors)
    }
}

/// The JSON config PEFT reads back for this adapter. `base_model` is what PEFT's
/// `AutoPeftModelForCausalLM` loads the base from (a Hugging Face folder or repository), or None
/// when there is none it could load (a GGUF file): then `null`, and the base is given by hand.
pub fn config_json(cfg: &AdapterConfig, gpt2: bool, base_model: Option<&str>) -> Value {
    let targets = match &cfg.target_regex {
        Some(re) => json!(re),
        None if cfg.targets.len() == 1 && cfg.targets[0] == ALL_LINEAR => json!(ALL_LINEAR),
        None => json!(cfg.targets),
    };
    let mut v = if cfg.method == Method::Vera {
        json!({
            "peft_type": "VERA",
            "task_type": "CAUSAL_LM",
            "r": cfg.rank,
            "target_modules": targets,
            "projection_prng_key": cfg.vera_seed,
            "save_projection": true,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.vera_d_initial,
            "fan_in_fan_out": gpt2,
            "bias": "none",
            "modules_to_save": null,
            "init_weights": true,
            "inference_mode": true,
            "base_model_name_or_path": base_model,
        })
    } else {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": targets,
            "fan_in_fan_out": gpt2,
            "use_rslora": cfg.rslora,
            "use_dora": cfg.method == Method::Dora,
            "bias": "none",
            "modules_to_save": null,
            "init_lora_weights": true,
            "inference_mode": true,
            "base_model_name_or_path": base_model,
            "rank_pattern": cfg.rank_pattern.iter().map(|(p, r)| (p.clone(), json!(r))).collect::<serde_json::Map<_, _>>(),
            "alpha_pattern": cfg.alpha_pattern.iter().map(|(p, a)| (p.clone(), json!(a))).collect::<serde_json::Map<_, _>>(),
        })
    };
    v["layers_to_transform"] = json!(cfg.layers);
    v
}

/// PEFT's `target_modules = "all-linear"`: every projection of the decoder layers.
pub const ALL_LINEAR: &str = "all-linear";

/// Keys of `adapter_config.json` that portalora reads.
const USED_KEYS: [&str; 15] = [
    "peft_type",
    "use_dora",
    "r",
    "lora_alpha",
    "lora_dropout",
    "vera_dropout",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "use_rslora",
    "projection_prng_key",
    "d_initial",
    "save_projection",
];

/// Keys that do not change what a saved adapter computes: metadata, how PEFT initialised it, or
/// settings that only matter together with an option refused below.
const NO_EFFECT_KEYS: [&str; 16] = [
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "init_weights",
    "peft_version",
    "auto_mapping",
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "ensure_weight_tying",
];

/// PEFT options that change what an adapter computes and that portalora does not implement.
const REFUSED_KEYS: [(&str, &str); 16] = [
    ("bias", "trained biases are not supported (portalora's adapters leave every bias frozen)"),
    ("modules_to_save", "fully trained extra modules (an LM head, embeddings) are not supported; portalora trains and loads adapters only"),
    ("lora_bias", "adapter biases are not supported"),
    ("layer_replication", "replicated layers are not supported"),
    ("exclude_modules", "excluded modules are not supported; list the target_modules instead"),
    ("target_parameters", "adapters on parameters (MoE experts) are not supported"),
    ("trainable_token_indices", "trainable tokens are not supported"),
    ("use_qalora", "QALoRA is not supported"),
    ("alora_invocation_tokens", "activated LoRA is not supported"),
    ("megatron_config", "Megatron layers are not supported"),
    ("arrow_config", "Arrow routing is not supported"),
    ("use_bdlora", "block-diagonal LoRA is not supported"),
    ("kasa_config", "KaSA is not supported"),
    ("monteclora_config", "MonteCLoRA is not supported"),
    ("velora_config", "VeLoRA is not supported"),
    ("runtime_config", "runtime options are not supported"),
];

/// The config's `key` (`rank_pattern`, `alpha_pattern`): pairs of module pattern and number.
fn read_pattern(config: &Value, cfg_path: &Path, key: &str) -> Result<Vec<(String, f64)>> {
    match &config[key] {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => m
            .iter()
            .map(|(p, v)| {
                let v = v.as_f64().ok_or_else(|| file_err(cfg_path, format!("{key} {p:?}: {v} is not a number")))?;
                Ok((p.clone(), v))
            })
            .collect(),
        v => Err(file_err(cfg_path, format!("{key} {v} is not an object of pattern: value"))),
    }
}

/// The config's `layers_to_transform`: one layer number or a list of them (None: every layer).
fn read_layers(config: &Value, cfg_path: &Path) -> Result<Option<Vec<usize>>> {
    match &config["layers_to_transform"] {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(Some(vec![n.as_u64().unwrap_or(u64::MAX) as usize])),
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_u64().map(|l| l as usize))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| file_err(cfg_path, "layers_to_transform must hold layer numbers")),
        v => Err(file_err(cfg_path, format!("layers_to_transform {v} is not a layer number or a list"))),
    }
}

/// Refuses a config that sets an option portalora does not implement, or one it does not know:
/// loading the tensors without it would be silently wrong. An option left at its "off" value
/// (null, false, empty, "none") is fine.
fn refuse_unsupported(config: &Value) -> std::result::Result<(), String> {
    let set = |v: &Value| match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty() && s != "none",
        _ => true,
    };
    let Some(keys) = config.as_object() else {
        return Err("not a JSON object".into());
    };
    for (key, v) in keys {
        if USED_KEYS.contains(&key.as_str()) || NO_EFFECT_KEYS.contains(&key.as_str()) || !set(v) {
            continue;
        }
        let why = match REFUSED_KEYS.iter().find(|(k, _)| k == key) {
            Some((_, why)) => why.to_string(),
            None => "portalora does not know this PEFT option, so it cannot tell whether the adapter computes \
                     something else with it; if it has no effect, remove it from the file"
                .into(),
        };
        return Err(format!("{key} = {v}: {why}"));
    }
    // PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA start by moving the base's weights by the initial
    // B·A (or quantizing them): such a file belongs to that residual base. PEFT converts the
    // first three to plain adapters (`path_initial_model_for_weight_conversion`, setting true).
    if let Some(init) = config["init_lora_weights"].as_str() {
        let convertible = init.starts_with("pissa") || ["olora", "corda"].contains(&init);
        if convertible || ["loftq", "lora_ga"].contains(&init) {
            let what = if convertible {
                "save it with PEFT's path_initial_model_for_weight_conversion, which converts it to a plain LoRA \
                 adapter of the original base"
            } else {
                "it needs the base its initialisation wrote, and portalora applies adapters to the base given"
            };
            return Err(format!(
                "init_lora_weights = {init:?}: this adapter was trained against a base its initialisation \
                 changed, so on the original base it computes something else; {what}"
            ));
        }
    }
    if config["save_projection"] == Value::Bool(false) {
        return Err("save_projection = false: the file lacks VeRA's shared pair (vera_A, vera_B), which portalora \
                    cannot re-derive from PEFT's random stream; save it with save_projection = true"
            .into());
    }
    let pattern = &config["layers_pattern"];
    let ok = |v: &Value| matches!(v.as_str(), Some("layers" | "h"));
    let fits = match pattern {
        Value::Null => true,
        Value::Array(a) => a.iter().all(ok),
        v => ok(v),
    };
    if !fits {
        return Err(format!(
            "layers_pattern = {pattern}: portalora's models keep their layers in \"layers\" (LLaMA) or \"h\" (GPT-2)"
        ));
    }
    Ok(())
}

/// Reads every slot of `adapter` back from the GPU, joining row parts, keyed as PEFT keys them.
/// (Async so that a browser can await it; natively [`save`] blocks on it.)
pub async fn export(ctx: &Context, adapter: &dyn Adapter) -> Result<BTreeMap<String, HostTensor>> {
    let mut reads = Vec::new();
    for slot in adapter.slots() {
        let parts = slot.parts.iter().map(|p| ctx.read(p)).collect::<std::result::Result<Vec<_>, _>>()?;
        reads.push((slot.key, slot.shape, parts));
    }
    let mut out = BTreeMap::new();
    for (key, shape, parts) in reads {
        let mut data = Vec::with_capacity(shape.iter().product());
        for r in parts {
            data.extend(r.await?);
        }
        out.insert(key, HostTensor { shape, data });
    }
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| AdapterError::Io { path: path.display().to_string(), source };
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Serialises f32 tensors as a safetensors file with metadata `{"format": "pt"}`.
pub fn safetensors_bytes(tensors: &BTreeMap<String, HostTensor>) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|source| AdapterError::Safetensors { what: format!("tensor {k:?}"), source })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta))
        .map_err(|source| AdapterError::Safetensors { what: "safetensors".into(), source })
}

/// Writes `adapter` as a PEFT folder `dir` (created if missing).
#[cfg(not(target_arch = "wasm32"))]
pub fn save(ctx: &Context, adapter: &dyn Adapter, gpt2: bool, base_model: Option<&str>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io { path: dir.display().to_string(), source })?;
    let tensors = crate::gpu::block_on(export(ctx, adapter))?;
    write_atomic(&dir.join(WEIGHTS_FILE), &safetensors_bytes(&tensors)?)?;
    let cfg = serde_json::to_string_pretty(&config_json(adapter.config(), gpt2, base_model))?;
    write_atomic(&dir.join(CONFIG_FILE), cfg.as_bytes())
}
