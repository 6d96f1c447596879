//! The model families beyond LLaMA and GPT-2 against transformers and PEFT
//! (tests/fixtures/gen_families.py, gen_adapters.py): Qwen2 (q/k/v biases, untied head), Qwen3
//! (q/k norms, head_dim ≠ hidden/heads), Llama 3 (llama3 rope scaling past the original context,
//! attention and MLP biases), Gemma 3 (1 + w norms, post norms, GeGLU, √hidden embeddings, sliding
//! and global layers past the window, a query scale other than 1/√head_dim, logit soft-capping)
//! and Mistral (a window in every layer). Each: loss, logits and layer-input gradients from the
//! Hugging Face folder; the same model from its GGUF; KV-cache generation equal to the full
//! forward at every position and to transformers' greedy tokens; the five methods' per-step
//! losses, first gradients and eval loss against PEFT.

mod common;

use common::peft::check_run;
use common::{context, fixture, ids_of, json};
use portalora::gpu::Context;
use portalora::model::gpu::{GpuModel, PlanOptions};
use portalora::model::{load_model, Weights};
use portalora::reference::max_rel_error;

const FAMILIES: [&str; 5] = ["qwen2", "qwen3", "llama3", "gemma3", "mistral"];

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

/// Loss and logits rows of `w` on the fixture's ids, against transformers.
fn check_loss_and_logits(ctx: &Context, name: &str, w: &Weights, e: &serde_json::Value) {
    let ids = ids_of(&e["input_ids"]);
    let (b, t) = (ids.len(), ids[0].len());
    let model = GpuModel::new(ctx, w, b, t).unwrap();
    ctx.fill_f32(&model.acts.logits, f32::NAN).unwrap();
    let (sum, n) = model.loss_sum(ctx, &ids).unwrap();
    let (got, want) = (sum / n as f64, e["loss"].as_f64().unwrap());
    assert!(rel(got, want) < 1e-5, "{name}: loss {got} vs transformers {want}");
    let logits = model.last_logits(ctx).unwrap();
    let v = w.config.vocab_size;
    for row in e["logits_rows"].as_array().unwrap() {
        let (bi, pos) = (row["batch"].as_u64().unwrap() as usize, row["pos"].as_u64().unwrap() as usize);
        let want: Vec<f64> = row["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let start = (bi * t + pos) * v;
        let err = max_rel_error(&logits[start..start + v], &want);
        assert!(err < 1e-4, "{name}: logits of row {bi} position {pos}: relative error {err:e}");
    }
}

#[test]
fn every_family_forward_matches_transformers() {
    let Some(ctx) = context() else { return };
    for f in FAMILIES {
        let name = format!("tiny_{f}");
        let w = load_model(fixture(&name)).unwrap();
        check_loss_and_logits(&ctx, &name, &w, &json(&fixture(&format!("{name}/expected.json"))));
    }
}

#[test]
fn every_family_loads_from_its_gguf_as_llama_cpp_writes_it() {
    let Some(ctx) = context() else { return };
    for f in ["qwen2", "qwen3", "llama3", "gemma3"] {
        let gguf = fixture(&format!("tiny_{f}.gguf"));
        let w = load_model(&gguf).unwrap();
        // Gemma 3's GGUF holds a second model whose settings a GGUF can carry (see the generator).
        let e = match f {
            "gemma3" => json(&fixture("tiny_gemma3_gguf.json")),
            _ => json(&fixture(&format!("tiny_{f}/expected.json"))),
        };
        check_loss_and_logits(&ctx, &format!("{f}.gguf"), &w, &e);
        if f != "gemma3" {
            // The same tensors as the Hugging Face folder (permutations and +1s undone).
            let hf = load_model(fixture(&format!("tiny_{f}"))).unwrap();
            // The same windows and rotary frequencies (Llama 3's as rope_freqs factors there).
            for (l, (g, h)) in w.config.layers.iter().zip(&hf.config.layers).enumerate() {
                assert_eq!(g.window, h.window, "{f}: layer {l}'s window");
                let hd = w.config.head_dim;
                let want: Vec<f64> = h.rope.inv_freq(hd).iter().map(|&x| x as f64).collect();
                let err = max_rel_error(&g.rope.inv_freq(hd), &want);
                assert!(err < 1e-6, "{f}: layer {l}'s rotary frequencies ({err:e})");
            }
            for (k, t) in &hf.tensors {
                let g = &w.tensors[k];
                assert_eq!(g.shape, t.shape, "{f}: {k}");
                let err = max_rel_error(&g.data, &t.data.iter().map(|&x| x as f64).collect::<Vec<_>>());
                assert!(err < 1e-6, "{f}: {k} differs from the folder's ({err:e})");
            }
        }
    }
}

#[test]
fn every_family_layer_input_gradients_match_transformers() {
    let Some(ctx) = context() else { return };
    for f in FAMILIES {
        let name = format!("tiny_{f}");
        let w = load_model(fixture(&name)).unwrap();
        let e = json(&fixture(&format!("{name}/expected.json")));
        let ids = ids_of(&e["input_ids"]);
        let opts = PlanOptions { keep_layer_grads: true, backward: true, ..PlanOptions::default() };
        let mut model = GpuModel::with_options(&ctx, &w, ids.len(), ids[0].len(), opts).unwrap();
        model.enable_backward(&ctx).unwrap();
        for d in &model.grads.as_ref().unwrap().dx {
            ctx.fill_f32(d, f32::NAN).unwrap();
        }
        model.forward_backward(&ctx, &ids).unwrap();
        let grads = e["layer_input_grads"].as_array().unwrap();
        assert_eq!(grads.len(), w.config.num_layers + 1);
        for (l, want) in grads.iter().enumerate() {
            let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got = ctx.read_f32(&model.grads.as_ref().unwrap().dx[l]).unwrap();
            let err = max_rel_error(&got, &want);
            assert!(err < 1e-4, "{name}: d loss / d input of layer {l}: relative error {err:e}");
        }
    }
}

#[test]
fn every_family_generates_with_a_kv_cache_as_the_full_forward_and_transformers() {
    use portalora::model::generate::{Generator, Sampling};
    use portalora::model::gpu::ParameterTensors;
    let Some(ctx) = context() else { return };
    for f in FAMILIES {
        let name = format!("tiny_{f}");
        let w = load_model(fixture(&name)).unwrap();
        let e = json(&fixture(&format!("{name}/expected.json")));
        let prompt: Vec<u32> = e["prompt"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<u32> = e["greedy"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let params = ParameterTensors::upload(&ctx, &w).unwrap();
        let mut gen = Generator::new(&ctx, &w.config, &params, prompt.len() + want.len()).unwrap();
        let got = gen.generate(&ctx, &prompt, want.len(), Sampling::default(), &[], |_| {}).unwrap();
        assert_eq!(got, want, "{name}: greedy tokens vs transformers");
        // Every position of the cached decode against the full forward of the whole sequence.
        let all: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let full = GpuModel::new(&ctx, &w, 1, all.len()).unwrap();
        full.loss_sum(&ctx, std::slice::from_ref(&all)).unwrap();
        let logits = full.last_logits(&ctx).unwrap();
        let v = w.config.vocab_size;
        gen.reset();
        let mut fed = gen.feed(&ctx, &all[..prompt.len()]).unwrap();
        for t in prompt.len() - 1..all.len() - 1 {
            let want: Vec<f64> = logits[t * v..(t + 1) * v].iter().map(|&x| x as f64).collect();
            let err = max_rel_error(&fed, &want);
            assert!(err < 1e-5, "{name}: cached logits at position {t}: relative error {err:e}");
            fed = gen.feed(&ctx, &[all[t + 1]]).unwrap();
        }
    }
}

macro_rules! family_methods {
    ($($name:ident: $family:literal),*) => {$(
        #[test]
        fn $name() {
            let Some(ctx) = context() else { return };
            for method in ["lora", "lora-plus", "lora-fa", "lora-fa-projected", "vera", "delta-lora"] {
                check_run(&ctx, $family, method);
            }
        }
    )*};
}

family_methods!(qwen2_methods_match_peft: "qwen2", qwen3_methods_match_peft: "qwen3",
    llama3_methods_match_peft: "llama3", gemma3_methods_match_peft: "gemma3",
    mistral_methods_match_peft: "mistral");

/// A GGUF base's merged folder gets a config.json written from its metadata: transformers'
/// reading of it (here: ours, which follows transformers' fields) must be the model that ran.
#[test]
fn every_family_config_written_for_a_gguf_base_reads_back_as_the_same_model() {
    use portalora::model::export::hf_config_json;
    use portalora::model::ModelConfig;
    for f in ["qwen2", "qwen3", "llama3", "gemma3"] {
        let w = load_model(fixture(&format!("tiny_{f}.gguf"))).unwrap();
        let c = &w.config;
        let v = hf_config_json(c).unwrap_or_else(|e| panic!("{f}: {e}"));
        let back = ModelConfig::from_hf_str(std::path::Path::new("config.json"), &v.to_string()).unwrap();
        assert_eq!(back.block, c.block, "{f}: block");
        assert_eq!((back.family, back.head_dim, back.num_kv_heads), (c.family, c.head_dim, c.num_kv_heads), "{f}");
        assert_eq!((back.tie_embeddings, back.norm_eps), (c.tie_embeddings, c.norm_eps), "{f}");
        for (l, (b, g)) in back.layers.iter().zip(&c.layers).enumerate() {
            assert_eq!(b.window, g.window, "{f}: layer {l}'s window");
            let want: Vec<f64> = g.rope.inv_freq(c.head_dim).iter().map(|&x| x as f64).collect();
            let err = max_rel_error(&b.rope.inv_freq(c.head_dim), &want);
            assert!(err < 1e-5, "{f}: layer {l}'s rotary frequencies ({err:e})");
        }
    }
}

/// Gemma 3's multimodal checkpoints (4B and up): the language model loads from under its prefix
/// (both transformers layouts), the vision tower is left out and said so, and a merged copy is a
/// text-only gemma3_text folder.
#[test]
fn a_multimodal_gemma3_checkpoint_loads_its_language_model() {
    use portalora::adapter::peft::safetensors_bytes;
    use portalora::model::export::write_hf_folder;
    let text = load_model(fixture("tiny_gemma3")).unwrap();
    let check = |w: &Weights, what: &str| {
        let left = w.left_out.as_ref().unwrap_or_else(|| panic!("{what}: nothing said left out"));
        assert_eq!(left.tensors, 34, "{what}: the vision tensors");
        assert_eq!(w.tensors, text.tensors, "{what}: the language model's tensors");
        // The generator drops the soft-cap (transformers' multimodal class does not apply it).
        let mut want = text.config.clone();
        want.block.final_softcap = None;
        assert_eq!(w.config, want, "{what}: the text config");
    };
    let mm = load_model(fixture("tiny_gemma3_mm")).unwrap();
    check(&mm, "language_model.model.*");
    // transformers 5's in-memory layout: model.language_model.*, model.vision_tower.*.
    let dir = common::tmp("gemma3_mm_v5");
    let mut renamed = std::collections::BTreeMap::new();
    portalora::model::weights::read_safetensors(&fixture("tiny_gemma3_mm/model.safetensors"), &mut renamed).unwrap();
    let renamed = renamed
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("language_model.model.") {
            Some(rest) => (format!("model.language_model.{rest}"), v),
            None => (format!("model.{k}"), v),
        })
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&renamed).unwrap()).unwrap();
    std::fs::copy(fixture("tiny_gemma3_mm/config.json"), dir.join("config.json")).unwrap();
    check(&load_model(&dir).unwrap(), "model.language_model.*");
    let out = dir.join("merged");
    write_hf_folder(&mm, &out).unwrap();
    let merged = load_model(&out).unwrap();
    assert!(merged.left_out.is_none());
    assert_eq!(merged.config.family, portalora::model::arch::Family::Gemma3);
    assert_eq!((merged.tensors == text.tensors, merged.config.layers == text.config.layers), (true, true));
    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["model_type"], "gemma3_text");
}

/// The LM head's input gradient summed over vocabulary slices in parallel (split-K, the default
/// on GPUs) gives the layer-input gradients of the plain product, chunks shorter than the chunk
/// size included.
#[test]
fn the_split_head_gradient_equals_the_plain_one() {
    use portalora::model::{Arch, HostTensor, ModelConfig};
    let Some(ctx) = context() else { return };
    if ctx.subgroup_size().is_none() {
        return;
    }
    let config = ModelConfig { norm_eps: 1e-5, ..ModelConfig::simple(Arch::Llama, 256, 64, 2, 4, 2, 96, 64) };
    let mut rng = portalora::rng::Rng::new(9);
    let tensors = portalora::model::weights::expected_tensors(&config)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = (0..n).map(|_| if shape.len() == 1 { 1.0 + 0.1 * rng.uniform() } else { 0.2 * rng.uniform() });
            (name, HostTensor { data: data.collect(), shape })
        })
        .collect();
    let w = Weights { config, tensors, raw: Default::default(), source: "random".into(), left_out: None };
    let ids: Vec<Vec<u32>> = (0..2).map(|_| (0..40).map(|_| (rng.next_u64() % 256) as u32).collect()).collect();
    let grads = |splits: usize| {
        let opts = PlanOptions {
            keep_layer_grads: true,
            backward: true,
            head_splits: Some(splits),
            logit_chunk_rows: Some(64),
            ..PlanOptions::default()
        };
        let mut model = GpuModel::with_options(&ctx, &w, ids.len(), ids[0].len(), opts).unwrap();
        model.enable_backward(&ctx).unwrap();
        for d in &model.grads.as_ref().unwrap().dx {
            ctx.fill_f32(d, f32::NAN).unwrap();
        }
        model.forward_backward(&ctx, &ids).unwrap();
        let sums = model.train_step().unwrap().labels().filter(|l| l.contains("reduce")).count();
        let g = model.grads.as_ref().unwrap();
        (g.dx.iter().map(|d| ctx.read_f32(d).unwrap()).collect::<Vec<_>>(), sums)
    };
    let ((plain, plain_sums), (split, split_sums)) = (grads(0), grads(16));
    assert_eq!(split_sums, plain_sums + 2, "one sum of the slices per chunk of logit rows");
    for (l, (p, s)) in plain.iter().zip(&split).enumerate() {
        let want: Vec<f64> = p.iter().map(|v| *v as f64).collect();
        let err = max_rel_error(s, &want);
        assert!(err < 1e-5, "layer {l}'s input gradient: split head {err:e} from the plain one");
    }
}
