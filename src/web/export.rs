//! GGUF in the page: the trained adapter as a GGUF LoRA file or the whole model merged (as
//! `portalora export` writes them, built in memory for a download), and GGUF LoRA files loaded to
//! continue from.

use wasm_bindgen::prelude::*;

use super::{err, Busy, Engine};
use crate::adapter::peft::{export, PeftFile};
use crate::adapter::Method;
use crate::io::gguf::{GgmlType, Gguf};
use crate::model::gguf_export::{dora_merged, factors, file_alpha, lora_gguf, merged_gguf, Factors};
use crate::model::weights::Weights;

#[wasm_bindgen]
impl Engine {
    /// The adapter being trained as GGUF: with `merged` false a LoRA adapter for llama.cpp's
    /// `--lora` and Ollama's `ADAPTER` (f32, or `ty` "f16"); with `merged` true the whole model
    /// with the adapter merged, from a model loaded as GGUF (its metadata and untouched tensors
    /// copied; every tensor in its own type, or `ty`; Delta-LoRA's W0 as the run moved it, read
    /// back from the GPU — its LoRA file alone is refused). Resolves to `[bytes, notes]`: the file and
    /// what the export has to say (JSON list of strings; e.g. how much of the adapter's change a
    /// quantized type keeps).
    #[wasm_bindgen(js_name = exportGguf)]
    pub fn export_gguf(&self, merged: bool, ty: Option<String>) -> js_sys::Promise {
        let (inner, busy) = (self.inner.clone(), self.busy.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let _busy = Busy::take(&busy)?;
            let g = inner.borrow();
            let run = g.run.as_ref().ok_or_else(|| err("start a run first"))?;
            let w = g.weights.as_ref().ok_or_else(|| err("load a model first"))?;
            let ty = ty
                .map(|t| GgmlType::from_name(&t).ok_or_else(|| err(format!("type {t:?} is not a ggml type"))))
                .transpose()?;
            let adapter = run.trainer.adapter();
            let cfg = adapter.config().clone();
            if cfg.method == Method::DeltaLora && !merged {
                return Err(err(
                    "Delta-LoRA moved the base weights too, so a LoRA file alone would not reproduce the fine-tune: \
                     download the merged GGUF",
                )
                .into());
            }
            if cfg.method == Method::Dora && !merged {
                return Err(err("llama.cpp has no DoRA adapters: download the merged GGUF").into());
            }
            let tensors = export(&g.ctx, adapter).await.map_err(err)?;
            let f = factors(&cfg, &tensors, &w.config).map_err(err)?;
            let (file, notes) = if merged {
                let base = g.gguf.as_ref().ok_or_else(|| {
                    err("a merged GGUF is written from a model loaded as GGUF; this one came as safetensors: \
                         download the GGUF adapter instead")
                })?;
                if cfg.method == Method::DeltaLora {
                    // W0 as Delta-LoRA moved it, read back from the GPU (the adapted weights only:
                    // the rest of the file is copied from the base).
                    let tensors = run.trainer.model.read_site_weights_async(&g.ctx).await.map_err(err)?;
                    let moved = Weights {
                        config: w.config.clone(),
                        tensors,
                        raw: Default::default(),
                        source: w.source.clone(),
                        left_out: None,
                    };
                    merged_gguf(base, &moved, &f, ty).map_err(err)?
                } else if cfg.method == Method::Dora {
                    let moved = dora_merged(w, &f, &tensors).map_err(err)?;
                    let as_is: Vec<_> = f.into_iter().map(|x| Factors { scale: 0.0, ..x }).collect();
                    merged_gguf(base, &moved, &as_is, ty).map_err(err)?
                } else {
                    merged_gguf(base, w, &f, ty).map_err(err)?
                }
            } else {
                let stem = g.name.trim_end_matches(".gguf");
                let name = format!("{stem} {} adapter", cfg.method);
                (
                    lora_gguf(&w.config, &f, file_alpha(&cfg), ty.unwrap_or(GgmlType::F32), &name).map_err(err)?,
                    Vec::new(),
                )
            };
            let out = js_sys::Array::new();
            out.push(&js_sys::Uint8Array::from(file.to_bytes().as_slice()));
            out.push(&JsValue::from_str(&serde_json::to_string(&notes).unwrap_or_default()));
            Ok(out.into())
        })
    }

    /// Loads a GGUF LoRA adapter file's bytes (from `exportGguf`, `portalora export` or llama.cpp's
    /// converter) for the next `start`, as `loadAdapter` loads PEFT's files. Returns a JSON
    /// description.
    #[wasm_bindgen(js_name = loadAdapterGguf)]
    pub fn load_adapter_gguf(&self, name: &str, bytes: Vec<u8>) -> Result<String, JsError> {
        let _busy = Busy::take(&self.busy)?;
        let g = Gguf::from_bytes(name, bytes).map_err(err)?;
        let f = PeftFile::from_gguf(&g).map_err(err)?;
        let desc = serde_json::json!({"peft_type": f.peft_type, "r": f.rank, "alpha": f.alpha, "targets": f.targets})
            .to_string();
        self.inner.borrow_mut().init = Some(f);
        Ok(desc)
    }
}
