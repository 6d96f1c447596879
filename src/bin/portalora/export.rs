//! `portalora export`: a fine-tune as GGUF for llama.cpp, Ollama and LM Studio — a LoRA adapter
//! file, or the whole model with the adapter merged — and, with `--modelfile`, Ollama's Modelfile.

use std::path::{Path, PathBuf};

use portalora::adapter::peft::{write_atomic, PeftFile};
use portalora::adapter::{AdapterConfig, Method};
use portalora::io::gguf::{GgmlType, Gguf};
use portalora::io::gguf_write::GgufOut;
use portalora::io::tokenizer::Tokenizer;
use portalora::model::gguf_export::{dora_merged, factors, file_alpha, lora_gguf, merged_gguf, Factors};
use portalora::model::gguf_hf::folder_gguf;
use portalora::model::ModelConfig;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ExportArgs {
    /// The base model the adapter was trained on: a .gguf file or a Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// The adapter: a folder (adapter_config.json + adapter_model.safetensors; `train --out`) or a
    /// GGUF LoRA file.
    #[arg(long)]
    adapter: PathBuf,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// lora: a GGUF LoRA adapter for the base (llama.cpp's --lora, Ollama's ADAPTER); merged: the
    /// whole model with the adapter merged (from a .gguf base, or from a Hugging Face folder laid
    /// out as llama.cpp's convert_hf_to_gguf.py would). [default: lora; Delta-LoRA: merged]
    #[arg(long = "as", value_parser = ["lora", "merged"])]
    as_: Option<String>,
    /// Tensor type: for lora f32 (default) or f16; for merged f32, f16, bf16, q8_0, q4_0, q4_1,
    /// q5_0, q5_1, q2_k, q3_k, q4_k, q5_k or q6_k [default: the base's own types, as stored; a
    /// folder's safetensors dtypes, 1-D tensors in f32].
    #[arg(long = "type")]
    ty: Option<String>,
    /// Also write an Ollama Modelfile beside --out (OUT without .gguf, plus .Modelfile): FROM the
    /// merged file, or FROM the base and ADAPTER the LoRA file, with the chat template's stop token.
    #[arg(long)]
    modelfile: bool,
    /// Replace --out (and the Modelfile) if they exist.
    #[arg(long)]
    overwrite: bool,
}

/// The method the adapter was trained with: its run's `run.json` says, else what the file's
/// type allows.
fn method_of(adapter: &Path, peft: &PeftFile) -> Method {
    portalora::adapter::peft::run_method(adapter).unwrap_or(peft.method())
}

fn model_config(model: &Path) -> Res<ModelConfig> {
    Ok(if model.is_dir() {
        ModelConfig::from_hf_json(&model.join("config.json"))?
    } else {
        ModelConfig::from_gguf(&Gguf::open(model)?)?
    })
}

/// Refuses to replace what exists (unless --overwrite) and to write over an input.
fn check_out(path: &Path, inputs: &[&Path], overwrite: bool) -> Res<()> {
    let abs = portalora::outdir::absolute(path);
    if inputs.iter().any(|i| portalora::outdir::absolute(i) == abs) {
        return Err(format!("--out {} is an input of this export; pick another file", path.display()).into());
    }
    if path.is_dir() {
        return Err(format!(
            "--out {} is a folder; give the GGUF file to write, e.g. {}/model.gguf",
            path.display(),
            path.display()
        )
        .into());
    }
    if path.exists() && !overwrite {
        return Err(format!("{} exists; pick another --out, or replace it with --overwrite", path.display()).into());
    }
    Ok(())
}

impl ExportArgs {
    pub(crate) fn check_inputs(&self) -> Result<(), String> {
        super::check_inputs(&[("--model", Some(&self.model)), ("--adapter", Some(&self.adapter))])
    }
}

/// The adapter of `--adapter`: the folder itself, or for a Delta-LoRA run's `--out` (a merged
/// model, its adapter in `adapter/`) that `adapter/` folder.
fn run_adapter(dir: &Path) -> PathBuf {
    let inner = dir.join("adapter");
    let delta_run = dir.join("run.json").exists()
        && !dir.join(portalora::adapter::peft::CONFIG_FILE).exists()
        && inner.join(portalora::adapter::peft::CONFIG_FILE).exists();
    match delta_run {
        true => inner,
        false => dir.to_path_buf(),
    }
}

pub(crate) fn export(a: &ExportArgs) -> Res<()> {
    let a = &ExportArgs { adapter: run_adapter(&a.adapter), ..a.clone() };
    let peft = PeftFile::read(&a.adapter)?;
    let method = method_of(&a.adapter, &peft);
    let merged = wants_merged(a, method)?;
    let ty =
        a.ty.as_deref()
            .map(|t| GgmlType::from_name(t).ok_or_else(|| format!("--type {t:?}: not a ggml type; see --help")))
            .transpose()?;
    let modelfile = a.out.with_extension("Modelfile");
    check_out(&a.out, &[&a.model, &a.adapter], a.overwrite)?;
    if a.modelfile {
        check_out(&modelfile, &[&a.model, &a.adapter], a.overwrite)?;
    }
    let config = model_config(&a.model)?;
    let cfg = peft.fits(&a.model, peft.adapter_config(method, &AdapterConfig::new(method)))?;
    let f = factors(&cfg, &peft.tensors_for(&config), &config)
        .map_err(|e| format!("{} does not fit {}: {e}", a.adapter.display(), a.model.display()))?;
    let name = a.out.file_stem().and_then(|s| s.to_str()).unwrap_or("adapter").to_string();
    let (file, notes) = if merged {
        merged_file(a, method, &peft, &config, f, ty)?
    } else {
        (lora_gguf(&config, &f, file_alpha(&cfg), ty.unwrap_or(GgmlType::F32), &name)?, Vec::new())
    };
    for n in &notes {
        errln!("note: {n}");
    }
    let bytes = file.to_bytes();
    write_atomic(&a.out, &bytes)?;
    // Every file is written before anything is printed (a closed stdout ends the command).
    if a.modelfile {
        write_atomic(&modelfile, modelfile_text(a, merged)?.as_bytes())?;
    }
    let what = if merged { "merged model" } else { "LoRA adapter" };
    outln!("wrote {} ({what}, {} tensors, {:.1} MB)", a.out.display(), file.tensors.len(), bytes.len() as f64 / 1e6);
    if a.modelfile {
        outln!("wrote {} — ollama create NAME -f {}", modelfile.display(), modelfile.display());
    } else if merged {
        outln!("run it: llama-cli -m {}", a.out.display());
    } else if a.model.is_dir() {
        outln!(
            "run it with the base as GGUF (llama.cpp's convert_hf_to_gguf.py): llama-cli -m BASE.gguf --lora {}",
            a.out.display()
        );
    } else {
        outln!("run it: llama-cli -m {} --lora {}", a.model.display(), a.out.display());
    }
    Ok(())
}

/// Whether to write the merged model (`--as`, else what the method needs), refusing a LoRA file for
/// the methods a LoRA file cannot carry.
fn wants_merged(a: &ExportArgs, method: Method) -> Res<bool> {
    match a.as_.as_deref() {
        Some("merged") => Ok(true),
        Some(_) if method == Method::DeltaLora => Err(format!(
            "{} is a Delta-LoRA adapter: Delta-LoRA moved the base weights too, so a LoRA file alone would not \
             reproduce the fine-tune; use --as merged",
            a.adapter.display()
        )
        .into()),
        Some(_) if method == Method::Dora => Err(format!(
            "{} is a DoRA adapter: llama.cpp has no DoRA adapters (its magnitudes rescale whole rows of the \
             weights, not a low-rank product); use --as merged",
            a.adapter.display()
        )
        .into()),
        Some(_) => Ok(false),
        None => Ok(matches!(method, Method::DeltaLora | Method::Dora)),
    }
}

/// The whole model with the adapter's factors `f` merged into the base, and notes on the way.
fn merged_file(
    a: &ExportArgs,
    method: Method,
    peft: &PeftFile,
    config: &ModelConfig,
    f: Vec<Factors>,
    ty: Option<GgmlType>,
) -> Res<(GgufOut, Vec<String>)> {
    // A Hugging Face base becomes the GGUF llama.cpp's converter would make of it.
    let base_weights = a.model.is_dir().then(|| crate::load_model(&a.model)).transpose()?;
    let base = match &base_weights {
        Some(w) => folder_gguf(&a.model, w)?,
        None => Gguf::open(&a.model)?,
    };
    Ok(if method == Method::DeltaLora {
        // The run's folder holds the whole model, W0 as Delta-LoRA moved it with s·B·A merged
        // in: its adapted weights are written as they are (a scale of 0 adds nothing).
        let run = a.adapter.join("..");
        let weights = portalora::model::load_model(&run).map_err(|e| {
            format!(
                "{}: Delta-LoRA's merged model is read from its run's folder {}: {e}",
                a.adapter.display(),
                run.display()
            )
        })?;
        let as_is: Vec<_> = f.into_iter().map(|x| Factors { scale: 0.0, ..x }).collect();
        merged_gguf(&base, &weights, &as_is, ty)?
    } else {
        let weights = match base_weights {
            Some(w) => w,
            None => crate::load_model(&a.model)?,
        };
        if method == Method::Dora {
            let moved = dora_merged(&weights, &f, &peft.tensors_for(config))?;
            let as_is: Vec<_> = f.into_iter().map(|x| Factors { scale: 0.0, ..x }).collect();
            merged_gguf(&base, &moved, &as_is, ty)?
        } else {
            merged_gguf(&base, &weights, &f, ty)?
        }
    })
}

/// Ollama's Modelfile: FROM the merged file, or FROM the base with the LoRA file as ADAPTER (paths
/// relative to the Modelfile where they lie beside it), and the chat template's end-of-turn text
/// as a stop sequence.
fn modelfile_text(a: &ExportArgs, merged: bool) -> Res<String> {
    let file = a.out.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let mut text = String::from("# Written by portalora export; `ollama create NAME -f THIS_FILE`.\n");
    if merged {
        text += &format!("FROM ./{file}\n");
    } else {
        text += &format!("FROM {}\nADAPTER ./{file}\n", portalora::outdir::absolute(&a.model).display());
    }
    let stop = Tokenizer::for_model(&a.model).ok().and_then(|t| t.chat_template(None).ok().flatten());
    if let Some(t) = stop {
        let end = t.end_of_turn()?;
        let end = end.trim_end();
        if !end.is_empty() {
            text += &format!("PARAMETER stop {}\n", serde_json::to_string(end)?);
        }
    }
    Ok(text)
}
