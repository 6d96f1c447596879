//! The engine inside a browser — headless Chromium's WebGPU (SwiftShader: subgroups of 4, no
//! shader-f16) — run by wasm-bindgen-test (`make test-web`): kernels against the f64 references,
//! and a short LoRA training run whose per-step losses, read back asynchronously, equal PyTorch +
//! PEFT's on the same fixture as the native test (tests/adapters.rs).
#![cfg(target_arch = "wasm32")]

use std::path::Path;

use portalora::adapter::peft::PeftFile;
use portalora::adapter::{AdapterConfig, Method};
use portalora::gpu::{Context, DType, Step};
use portalora::model::weights::load_safetensors_bytes;
use portalora::ops::attention::{attention_forward, AttentionShape};
use portalora::ops::matmul::{matmul, Matmul};
use portalora::reference::{self, max_rel_error};
use portalora::rng::Rng;
use portalora::train::{Batch, TrainConfig, Trainer};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

async fn context() -> Context {
    let ctx =
        Context::new().await.expect("no WebGPU adapter: Chromium needs --enable-unsafe-webgpu (see webdriver.json)");
    let backend = ctx.info().backend.to_lowercase();
    assert!(backend.contains("webgpu"), "expected the browser's WebGPU, got {backend}");
    ctx
}

fn ids_of(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

#[wasm_bindgen_test]
async fn matmul_and_attention_match_the_references() {
    let ctx = context().await;
    let mut rng = Rng::new(5);
    for (m, k, n) in [(1, 1, 1), (7, 33, 5), (33, 16, 20)] {
        for (ta, tb) in [(false, false), (false, true), (true, false)] {
            let a = rng.vec(m * k);
            let b = rng.vec(k * n);
            let (sa, sb) = (if ta { [k, m] } else { [m, k] }, if tb { [n, k] } else { [k, n] });
            let at = ctx.upload_f32("a", &sa, &a).unwrap();
            let bt = ctx.upload_f32("b", &sb, &b).unwrap();
            let c = ctx.upload_f32("c", &[m, n], &vec![f32::NAN; m * n]).unwrap();
            let mut s = Step::new();
            matmul(&ctx, &mut s, &at, &bt, &c, Matmul { trans_a: ta, trans_b: tb, ..Matmul::nn() }).unwrap();
            ctx.run(&s).unwrap();
            let got = ctx.read(&c).unwrap().await.unwrap();
            let want = reference::matmul(&a, &b, m, k, n, ta, tb);
            assert!(max_rel_error(&got, &want) < 1e-5, "matmul {m}x{k}x{n} ta={ta} tb={tb}");
        }
    }
    for (batch, seq, heads, kv_heads, d) in [(1, 7, 3, 1, 8), (2, 5, 2, 2, 6)] {
        let q = rng.vec(batch * seq * heads * d);
        let k = rng.vec(batch * seq * kv_heads * d);
        let v = rng.vec(batch * seq * kv_heads * d);
        let (want, _) =
            reference::attention_forward(&q, &k, &v, batch, seq, heads, kv_heads, d, 0, 1.0 / (d as f64).sqrt());
        let up = |name: &str, x: &[f32]| ctx.upload_f32(name, &[x.len()], x).unwrap();
        let out = up("out", &vec![f32::NAN; q.len()]);
        let lse = up("lse", &vec![f32::NAN; batch * heads * seq]);
        let shape = AttentionShape::new(batch, seq, heads, kv_heads, d);
        let mut s = Step::new();
        attention_forward(&ctx, &mut s, shape, &up("q", &q), &up("k", &k), &up("v", &v), &out, &lse).unwrap();
        ctx.run(&s).unwrap();
        let got = ctx.read(&out).unwrap().await.unwrap();
        assert!(max_rel_error(&got, &want) < 1e-5, "attention {shape:?}");
    }
}

/// The tiny GPT-2 of tests/fixtures (the native tests' model).
fn tiny_gpt2() -> portalora::model::Weights {
    load_safetensors_bytes(
        "tiny_gpt2",
        include_str!("fixtures/tiny_gpt2/config.json"),
        &[include_bytes!("fixtures/tiny_gpt2/model.safetensors")],
    )
    .unwrap()
}

/// A PEFT fixture of the tiny GPT-2 (tests/fixtures/adapters/gpt2_NAME): expected.json, the
/// initial adapter's config and weights.
macro_rules! gpt2_fixture {
    ($name:literal) => {
        (
            include_str!(concat!("fixtures/adapters/gpt2_", $name, "/expected.json")),
            include_str!(concat!("fixtures/adapters/gpt2_", $name, "/init/adapter_config.json")),
            &include_bytes!(concat!("fixtures/adapters/gpt2_", $name, "/init/adapter_model.safetensors"))[..],
        )
    };
}

/// PEFT's gpt2_lora fixture run in the browser with `memory`'s settings (recompute_mlp,
/// activations_f16): every step's loss and the eval loss after training within `tol`.
async fn gpt2_lora_matches_peft(memory: TrainConfig, tol: f64) {
    gpt2_matches_peft(Method::Lora, gpt2_fixture!("lora"), memory, tol).await
}

/// A gpt2 fixture's run (`method`, from its initial adapter) in the browser.
async fn gpt2_matches_peft(
    method: Method,
    (expected, config, weights): (&str, &str, &[u8]),
    memory: TrainConfig,
    tol: f64,
) {
    let ctx = context().await;
    let w = tiny_gpt2();
    let e: serde_json::Value = serde_json::from_str(expected).unwrap();
    let peft = PeftFile::from_bytes(Path::new("init"), config, weights).unwrap();
    let cfg = peft.adapter_config(method, &AdapterConfig::new(method)).unwrap();
    let tc = TrainConfig {
        lr: e["lr"].as_f64().unwrap(),
        weight_decay: e["weight_decay"].as_f64().unwrap(),
        eps: e["eps"].as_f64().unwrap(),
        max_grad_norm: 0.0,
        total_steps: Some(4),
        ..memory
    };
    let ids = ids_of(&e["input_ids"]);
    let mut trainer = Trainer::new(&ctx, &w, ids.len(), ids[0].len(), &cfg, &tc, Some(&peft)).unwrap();
    let halves = trainer.model.acts.halves.iter().filter(|h| !h.kept.is_empty()).count();
    assert_eq!(halves, if tc.activations_f16 { w.config.num_layers } else { 0 }, "layers keeping f16 copies");
    for (i, want) in e["losses"].as_array().unwrap().iter().enumerate() {
        let want = want.as_f64().unwrap();
        let got =
            trainer.train_step_async(&ctx, &[Batch { ids: &ids, predict: None, positions: None }]).await.unwrap().loss;
        assert!((got - want).abs() / want < tol, "step {}: loss {got} vs PEFT {want}", i + 1);
    }
    let eval = trainer.eval_loss_async(&ctx, &ids_of(&e["eval_ids"]), None).await.unwrap();
    let want = e["eval_loss"].as_f64().unwrap();
    assert!((eval - want).abs() / want < tol, "eval loss {eval} vs PEFT {want}");
}

/// The browser's memory-saving path (the page's plain path is driven by tests/web/e2e.mjs).
#[wasm_bindgen_test]
async fn lora_training_matches_peft_in_the_browser() {
    gpt2_lora_matches_peft(TrainConfig { recompute_mlp: true, ..TrainConfig::default() }, 1e-4).await
}

/// DoRA in the browser: PEFT's use_dora run (magnitudes, the norms reduced on the GPU) step for
/// step.
#[wasm_bindgen_test]
async fn dora_training_matches_peft_in_the_browser() {
    gpt2_matches_peft(Method::Dora, gpt2_fixture!("dora"), TrainConfig::default(), 1e-4).await
}

/// `--activations f16` in the browser (no shader-f16 there: the conversions are integer code):
/// PEFT's losses within what f16's rounding of the kept activations moves.
#[wasm_bindgen_test]
async fn f16_activations_train_in_the_browser() {
    gpt2_lora_matches_peft(TrainConfig { activations_f16: true, ..TrainConfig::default() }, 1e-3).await
}

/// The GGUF types the packed loads read, with a matrix shape of whole blocks.
const PACKED: [(portalora::io::gguf::GgmlType, portalora::gpu::DType); 11] = {
    use portalora::gpu::DType as D;
    use portalora::io::gguf::GgmlType as G;
    [
        (G::F16, D::F16),
        (G::Q8_0, D::Q8_0),
        (G::Q4_0, D::Q4_0),
        (G::Q4_1, D::Q4_1),
        (G::Q5_0, D::Q5_0),
        (G::Q5_1, D::Q5_1),
        (G::Q2_K, D::Q2_K),
        (G::Q3_K, D::Q3_K),
        (G::Q4_K, D::Q4_K),
        (G::Q5_K, D::Q5_K),
        (G::Q6_K, D::Q6_K),
    ]
};

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(err <= tol * (1.0 + w.abs()), "{what}: [{i}] {g} vs {w} (err {err:e})");
    }
}

/// Every packed type through the browser's matmul (both orientations) and embedding lookup,
/// against f64 products over the values GGUF's dequantizer gives (as tests/quant.rs natively).
#[wasm_bindgen_test]
async fn packed_types_match_the_dequantized_values_in_the_browser() {
    use portalora::io::gguf::dequantize;
    use portalora::ops::embed::embed_forward;
    use portalora::ops::quant::{pack, quantize};
    let ctx = context().await;
    let mut rng = Rng::new(21);
    if !ctx.features().subgroups {
        // wgpu's WebGPU backend offers no subgroups today: packed bases are read by the subgroup
        // matmul only, so the page loads them as f32 (`BaseDType::Auto`), and asking is refused.
        let (ggml, dtype) = PACKED[1];
        let b = ctx.upload_packed("W", dtype, &[4, 32], &pack(ggml, &quantize(ggml, &rng.vec(128)))).unwrap();
        let (a, c) =
            (ctx.upload_f32("x", &[2, 32], &rng.vec(64)).unwrap(), ctx.tensor("y", &[2, 4], DType::F32).unwrap());
        let e = matmul(&ctx, &mut Step::new(), &a, &b, &c, Matmul::nt()).unwrap_err();
        assert!(e.to_string().contains("subgroup"), "{e}");
        return;
    }
    for (ggml, dtype) in PACKED {
        let cols = if dtype.block() == 256 { 512 } else { 96 };
        for (m, rows, trans_b) in [(7usize, 36usize, true), (33, 12, false)] {
            let w = rng.vec(rows * cols);
            let raw = quantize(ggml, &w);
            let deq = dequantize(ggml, &raw);
            let b = ctx.upload_packed("W", dtype, &[rows, cols], &pack(ggml, &raw)).unwrap();
            let (k, n) = if trans_b { (cols, rows) } else { (rows, cols) };
            let x = rng.vec(m * k);
            let a = ctx.upload_f32("x", &[m, k], &x).unwrap();
            let c = ctx.upload_f32("y", &[m, n], &vec![f32::NAN; m * n]).unwrap();
            let mut s = Step::new();
            matmul(&ctx, &mut s, &a, &b, &c, Matmul { trans_b, ..Matmul::default() }).unwrap();
            ctx.run(&s).unwrap();
            let got = ctx.read(&c).unwrap().await.unwrap();
            let want = reference::matmul(&x, &deq, m, k, n, false, trans_b);
            close(&got, &want, 2e-5, &format!("matmul {dtype:?} m={m} W ({rows}, {cols}) tb={trans_b}"));
        }
        let vocab = 37;
        let table = rng.vec(vocab * cols);
        let raw = quantize(ggml, &table);
        let deq = dequantize(ggml, &raw);
        let t = ctx.upload_packed("table", dtype, &[vocab, cols], &pack(ggml, &raw)).unwrap();
        let ids: Vec<u32> = (0..19).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
        let id_t = ctx.upload_u32("ids", &[ids.len()], &ids).unwrap();
        let out = ctx.upload_f32("out", &[ids.len(), cols], &vec![f32::NAN; ids.len() * cols]).unwrap();
        let mut s = Step::new();
        embed_forward(&ctx, &mut s, &id_t, &t, &out).unwrap();
        ctx.run(&s).unwrap();
        let got = ctx.read(&out).unwrap().await.unwrap();
        let want: Vec<f64> = ids
            .iter()
            .flat_map(|&i| deq[i as usize * cols..(i as usize + 1) * cols].iter().map(|&v| v as f64))
            .collect();
        close(&got, &want, 0.0, &format!("embed {dtype:?}"));
    }
}

/// The families of tests/families.rs in the browser: the base's loss on the fixture's ids
/// (through the trainer, whose fresh LoRA adds nothing) against transformers'.
#[wasm_bindgen_test]
async fn every_family_forward_matches_transformers_in_the_browser() {
    macro_rules! family {
        ($f:literal) => {
            (
                $f,
                include_str!(concat!("fixtures/tiny_", $f, "/config.json")),
                &include_bytes!(concat!("fixtures/tiny_", $f, "/model.safetensors"))[..],
                include_str!(concat!("fixtures/tiny_", $f, "/expected.json")),
            )
        };
    }
    let ctx = context().await;
    let families = [family!("qwen2"), family!("qwen3"), family!("llama3"), family!("gemma3"), family!("mistral")];
    for (name, config, weights, expected) in families {
        let w = load_safetensors_bytes(name, config, &[weights]).unwrap();
        let e: serde_json::Value = serde_json::from_str(expected).unwrap();
        let ids = ids_of(&e["input_ids"]);
        let cfg = AdapterConfig { targets: vec!["q_proj".into()], ..AdapterConfig::new(Method::Lora) };
        let trainer = Trainer::new(&ctx, &w, ids.len(), ids[0].len(), &cfg, &TrainConfig::default(), None).unwrap();
        let got = trainer.eval_loss_async(&ctx, &ids, None).await.unwrap();
        let want = e["loss"].as_f64().unwrap();
        assert!((got - want).abs() / want < 1e-5, "{name}: loss {got} vs transformers {want}");
    }
}

/// GELU (GPT-2, Gemma's GeGLU) and the logit soft-cap past where tanh computed from exp
/// overflows (|u| ≈ 44): SwiftShader's tanh returned NaN there, which made Gemma-3-270M's
/// first layer NaN in the browser while lavapipe's was fine.
#[wasm_bindgen_test]
async fn activations_stay_exact_where_tanh_saturates_in_the_browser() {
    use portalora::ops::act::{geglu_backward, gelu_forward};
    use portalora::ops::elementwise::softcap_forward;
    let ctx = context().await;
    let mut rng = Rng::new(22);
    let x: Vec<f32> = rng.vec(300).iter().enumerate().map(|(i, v)| v * [1.0, 30.0, 300.0, 3000.0][i % 4]).collect();
    let up = rng.vec(x.len());
    let dout = rng.vec(x.len());
    let t = |name: &str, v: &[f32]| ctx.upload_f32(name, &[v.len()], v).unwrap();
    let nan = || vec![f32::NAN; x.len()];
    let (xt, upt, doutt) = (t("x", &x), t("up", &up), t("dout", &dout));
    let (out, dgate, dup, capped) = (t("out", &nan()), t("dgate", &nan()), t("dup", &nan()), t("capped", &x));
    let mut s = Step::new();
    gelu_forward(&ctx, &mut s, &xt, &out).unwrap();
    geglu_backward(&ctx, &mut s, &xt, &upt, &doutt, &dgate, &dup).unwrap();
    softcap_forward(&ctx, &mut s, 30.0, &capped).unwrap();
    ctx.run(&s).unwrap();
    let gelu = |x: f64| 0.5 * x * (1.0 + (0.7978845608028654 * (x + 0.044715 * x * x * x)).tanh());
    let gelu_grad = |x: f64| {
        let th = (0.7978845608028654 * (x + 0.044715 * x * x * x)).tanh();
        0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    };
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    close(&ctx.read(&out).unwrap().await.unwrap(), &xs.iter().map(|&v| gelu(v)).collect::<Vec<_>>(), 1e-5, "gelu");
    let want: Vec<f64> = (0..x.len()).map(|i| dout[i] as f64 * up[i] as f64 * gelu_grad(xs[i])).collect();
    close(&ctx.read(&dgate).unwrap().await.unwrap(), &want, 1e-5, "geglu dgate");
    let want: Vec<f64> = (0..x.len()).map(|i| dout[i] as f64 * gelu(xs[i])).collect();
    close(&ctx.read(&dup).unwrap().await.unwrap(), &want, 1e-5, "geglu dup");
    let want: Vec<f64> = xs.iter().map(|&v| 30.0 * (v / 30.0).tanh()).collect();
    close(&ctx.read(&capped).unwrap().await.unwrap(), &want, 1e-5, "softcap");
}

/// Gemma-3-270M's f32 token table (262,144 × 640, 640 MiB) fits one of the browser's 1 GiB
/// bindings, so there it stays one part (lavapipe splits it): the lookup and the tied LM head's
/// product over the whole table, checked at rows across it.
#[wasm_bindgen_test]
async fn a_gemma_sized_table_in_one_binding_in_the_browser() {
    let ctx = context().await;
    let (rows, cols, m) = (262144usize, 640usize, 8usize);
    let mut rng = Rng::new(23);
    let table = rng.vec(rows * cols);
    let t = ctx.upload_f32("table", &[rows, cols], &table).unwrap();
    let ids: Vec<u32> = vec![0, 1, 262143, 131072, 70000, 200000, 5, 99999];
    let id_t = ctx.upload_u32("ids", &[m], &ids).unwrap();
    let out = ctx.upload_f32("out", &[m, cols], &vec![f32::NAN; m * cols]).unwrap();
    let logits = ctx.upload_f32("logits", &[m, rows], &vec![f32::NAN; m * rows]).unwrap();
    let mut s = Step::new();
    portalora::ops::embed::embed_forward(&ctx, &mut s, &id_t, &t, &out).unwrap();
    matmul(&ctx, &mut s, &out, &t, &logits, Matmul::nt()).unwrap();
    ctx.run(&s).unwrap();
    let e = ctx.read(&out).unwrap().await.unwrap();
    close(&e, &reference::embed_forward(&ids, &table, cols), 0.0, "embedding rows");
    let l = ctx.read(&logits).unwrap().await.unwrap();
    assert!(l.iter().all(|v| v.is_finite()), "logits left unwritten");
    for i in 0..m {
        for c in [0usize, 1, 65535, 65536, 131071, 200000, 262143] {
            let want: f64 = (0..cols).map(|j| e[i * cols + j] as f64 * table[c * cols + j] as f64).sum();
            close(&l[i * rows + c..i * rows + c + 1], &[want], 1e-5, &format!("logit ({i}, {c})"));
        }
    }
}

/// Chat data in the browser: a conversation rendered with a chat template (minijinja in wasm)
/// and tokenized, the assistant's turn and its end of turn the only targets (as natively).
#[wasm_bindgen_test]
async fn chat_data_renders_and_marks_the_assistant_in_the_browser() {
    use portalora::data::{self, ChatOptions};
    use portalora::io::gguf::Gguf;
    use portalora::io::tokenizer::{TemplateText, Tokenizer};
    let g = Gguf::from_bytes("spm.gguf", include_bytes!("fixtures/tokenizers/spm.gguf").to_vec()).unwrap();
    let mut tok = Tokenizer::from_gguf(&g).unwrap();
    tok.chat_template = Some(TemplateText {
        origin: "chatml".into(),
        text: "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}\
               {% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
            .into(),
    });
    let jsonl =
        r#"{"messages": [{"role": "user", "content": "Hi there "}, {"role": "assistant", "content": "Hello!"}]}"#;
    let (docs, _) = data::tokenized_text("chat.jsonl", jsonl.into(), &tok, &ChatOptions::default()).unwrap();
    let runs = data::target_runs(&tok, &docs[0]).unwrap();
    let text: String = runs.iter().map(|(t, _)| t.as_str()).collect();
    let marked: String = runs.iter().filter(|(_, m)| *m).map(|(t, _)| t.as_str()).collect();
    assert!(text.contains("user\nHi there<|im_end|>") && text.contains("assistant\n"), "{text:?}");
    assert!(marked.contains("Hello!") && !marked.contains("Hi there"), "targets {marked:?} of {text:?}");
    assert!(docs[0].chat && !docs[0].no_assistant);
}

/// The loss of one row summed over every token but each document's first (`pos` 0), with the
/// document positions given to the model when `packed`.
async fn loss_sum(ctx: &Context, t: &Trainer, ids: Vec<u32>, pos: Vec<u32>, packed: bool) -> f64 {
    let predict: Vec<Vec<bool>> = vec![pos.iter().map(|&p| p > 0).collect()];
    let n = predict[0].iter().filter(|&&p| p).count() as f64;
    let (rows, positions) = (vec![ids], vec![pos]);
    let b = Batch { ids: &rows, predict: Some(&predict), positions: packed.then_some(&positions[..]) };
    t.eval_rows_async(ctx, &b).await.unwrap() * n
}

/// Documents packed into one row see only themselves in the browser too (the fused kernels,
/// without subgroups): the row's loss sum equals its documents' alone.
#[wasm_bindgen_test]
async fn a_packed_row_equals_its_documents_alone_in_the_browser() {
    let ctx = context().await;
    let w = tiny_gpt2();
    let mut rng = Rng::new(41);
    let lengths = [5usize, 9, 3, 7];
    let docs: Vec<Vec<u32>> = lengths.iter().map(|&l| (0..l).map(|_| (rng.next_u64() % 67) as u32).collect()).collect();
    let cfg = AdapterConfig { targets: vec!["c_attn".into()], rank: 4, ..AdapterConfig::new(Method::Lora) };
    let packed = Trainer::new(&ctx, &w, 1, 24, &cfg, &TrainConfig::default(), None).unwrap();
    let pos: Vec<u32> = lengths.iter().flat_map(|&l| 0..l as u32).collect();
    let got = loss_sum(&ctx, &packed, docs.concat(), pos, true).await;
    let mut want = 0.0;
    for d in &docs {
        let alone = Trainer::new(&ctx, &w, 1, d.len(), &cfg, &TrainConfig::default(), None).unwrap();
        want += loss_sum(&ctx, &alone, d.clone(), (0..d.len() as u32).collect(), false).await;
    }
    assert!((got - want).abs() <= 1e-5 * want, "packed {got} vs documents alone {want}");
}

/// A rejected `Engine` call's message.
fn message(e: wasm_bindgen::JsError) -> String {
    let v: wasm_bindgen::JsValue = e.into();
    js_sys::Error::from(v).message().into()
}

/// One `Engine.step()` resolved, as JSON (or its rejection's message).
async fn engine_step(e: &portalora::web::Engine) -> Result<serde_json::Value, String> {
    match wasm_bindgen_futures::JsFuture::from(e.step()).await {
        Ok(v) => Ok(serde_json::from_str(&v.as_string().unwrap()).unwrap()),
        Err(v) => Err(js_sys::Error::from(v).message().into()),
    }
}

/// The page's engine runs on the command line's defaults (rows clamped to the model's context)
/// and walks the same rows as the shared run state: its first step's loss equals a trainer's on
/// the first micro-batch of a `RunState` made here from the same text and plan. Its cadence
/// (evaluations, the end) is the run state's, and settings the method would ignore are refused.
#[wasm_bindgen_test]
async fn the_page_engine_runs_the_shared_run_state_with_the_shared_defaults_in_the_browser() {
    use portalora::data::{self, ChatOptions, Packing};
    use portalora::io::tokenizer::Tokenizer;
    use portalora::run::{Plan, RunData, RunDefaults, RunState, DEFAULTS};
    use portalora::web::Engine;
    let e = Engine::create().await.map_err(message).unwrap();
    let defaults = |e: &Engine| serde_json::from_str::<serde_json::Value>(&e.defaults()).unwrap();
    assert_eq!(defaults(&e), serde_json::to_value(DEFAULTS).unwrap(), "before a model: the defaults");
    let (config, tokenizer) =
        (include_str!("fixtures/tiny_gpt2/config.json"), include_bytes!("fixtures/tiny_gpt2/tokenizer.json"));
    let weights = include_bytes!("fixtures/tiny_gpt2/model.safetensors");
    let desc =
        e.load_safetensors("tiny", config, weights.to_vec(), Some(tokenizer.to_vec()), None).map_err(message).unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&desc).unwrap()["notes"], serde_json::json!([]));
    let w = tiny_gpt2();
    let d = RunDefaults::for_model(&w.config);
    assert_eq!(d.seq, 40, "the tiny model's context");
    assert_eq!(defaults(&e), serde_json::to_value(d).unwrap());

    let text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n".repeat(30);
    let start = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"targets": ["c_attn", "c_fc"], "steps": 3, "text": text});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        e.start(&c.to_string()).map_err(message)
    };
    let s: serde_json::Value = serde_json::from_str(&start(serde_json::json!({"eval_every": 2})).unwrap()).unwrap();
    let set = &s["settings"];
    assert_eq!(
        (set["method"].as_str(), set["rank"].as_u64(), set["alpha"].as_f64(), set["lr"].as_f64()),
        (Some(DEFAULTS.method), Some(DEFAULTS.rank as u64), Some(DEFAULTS.alpha), Some(DEFAULTS.lr))
    );
    assert_eq!((set["batch"].as_u64(), set["seq"].as_u64(), set["steps"].as_u64()), (Some(4), Some(40), Some(3)));
    assert_eq!(set["activations"], "f32");

    // The same rows, made here through the shared pipeline, and a trainer on the defaults.
    let tok = Tokenizer::from_json_bytes(Path::new("tiny"), tokenizer).unwrap();
    let (docs, sources) = data::tokenized_text("the text", text.clone(), &tok, &ChatOptions::default()).unwrap();
    let ds = data::dataset(Path::new("the text"), docs, sources, Packing::Packed, d.seq, d.val_fraction, d.seed, &tok)
        .unwrap();
    assert_eq!(s["train_rows"].as_u64(), Some(ds.train.len() as u64));
    let plan = Plan { steps: Some(3), eval_every: 2, ..Plan::default() };
    let mut state = RunState::new(RunData { train: ds.train, val: ds.val, ..RunData::default() }, &plan).unwrap();
    let ctx = context().await;
    let acfg = AdapterConfig { targets: vec!["c_attn".into(), "c_fc".into()], ..AdapterConfig::new(Method::Lora) };
    let tc = TrainConfig { total_steps: Some(3), ..TrainConfig::default() };
    let mut trainer = Trainer::new(&ctx, &w, state.batch(), state.seq(), &acfg, &tc, None).unwrap();
    let micro = state.next_step();
    let want = trainer.train_step_async(&ctx, &[micro[0].batch()]).await.unwrap().loss;

    let steps = [engine_step(&e).await.unwrap(), engine_step(&e).await.unwrap(), engine_step(&e).await.unwrap()];
    let got = steps[0]["loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "the page's first step: loss {got}, the shared run state's {want}"
    );
    let due: Vec<(bool, bool)> =
        steps.iter().map(|s| (s["evaluate"].as_bool().unwrap(), s["done"].as_bool().unwrap())).collect();
    assert_eq!(due, [(false, false), (true, false), (true, true)]);
    let after = engine_step(&e).await.unwrap_err();
    assert!(after.contains("taken its 3 steps"), "{after}");

    // What the method would ignore, or a run that could not do what it says, is refused.
    let vera = start(serde_json::json!({"method": "vera", "alpha": 8})).unwrap_err();
    assert!(vera.contains("alpha: VeRA has no alpha"), "{vera}");
    let delta = start(serde_json::json!({"method": "delta-lora"})).unwrap_err();
    assert!(delta.contains("--delta-warmup 500") && delta.contains("never move"), "{delta}");
    let long = start(serde_json::json!({"seq": 41})).unwrap_err();
    assert!(long.contains("41"), "{long}");
    let bf16 = start(serde_json::json!({"activations": "bf16"})).unwrap_err();
    assert!(bf16.contains("\"bf16\"") && bf16.contains("\"f16\""), "{bf16}");
    let half: serde_json::Value =
        serde_json::from_str(&start(serde_json::json!({"activations": "f16"})).unwrap()).unwrap();
    assert_eq!(half["settings"]["activations"], "f16");
    assert!(half["kept_bytes"].as_u64() < s["kept_bytes"].as_u64(), "f16 keeps less: {half} vs {s}");

    // A schedule runs over the run's own length, as transformers' get_cosine_schedule_with_warmup.
    start(serde_json::json!({"schedule": "cosine", "warmup_steps": 1, "steps": 4, "lr": 1e-3})).unwrap();
    for t in 1..=4u64 {
        let lr = engine_step(&e).await.unwrap()["lr"].as_f64().unwrap();
        let i = t - 1;
        let m = if i < 1 { 0.0 } else { 0.5 * (1.0 + (std::f64::consts::PI * (i - 1) as f64 / 3.0).cos()) };
        assert!((lr - 1e-3 * m).abs() <= 1e-12, "the page's step {t}: lr {lr}, transformers {}", 1e-3 * m);
    }
}

async fn engine_eval(e: &portalora::web::Engine) -> f64 {
    wasm_bindgen_futures::JsFuture::from(e.eval())
        .await
        .map_err(|v| js_sys::Error::from(v).message())
        .unwrap()
        .as_f64()
        .unwrap()
}

/// A Delta-LoRA run in the page downloads merged with W0 as the run moved it (read back from the
/// GPU): the merged GGUF, loaded as a model of its own, gives the run's validation loss.
#[wasm_bindgen_test]
async fn a_delta_lora_run_in_the_page_exports_merged_with_the_weights_it_moved_in_the_browser() {
    use portalora::web::Engine;
    let base = include_bytes!("fixtures/tokenizers/llama-bpe.gguf").to_vec();
    let text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n".repeat(20);
    let run = |e: &Engine, method: &str, steps: u64| {
        let c = serde_json::json!({"method": method, "targets": ["q_proj", "v_proj", "down_proj"], "steps": steps,
            "text": text, "seq": 16, "lr": 0.05, "delta_warmup": 1});
        let mut c = c;
        if method != "delta-lora" {
            c.as_object_mut().unwrap().remove("delta_warmup");
        }
        e.start(&c.to_string()).map_err(message).unwrap();
    };
    let e = Engine::create().await.map_err(message).unwrap();
    e.load_gguf("base.gguf", base.clone()).map_err(message).unwrap();
    run(&e, "delta-lora", 4);
    let before = engine_eval(&e).await;
    for _ in 0..4 {
        engine_step(&e).await.unwrap();
    }
    let trained = engine_eval(&e).await;
    assert!((trained - before).abs() > 1e-3, "the run moved the loss: {before} → {trained}");
    let lora = wasm_bindgen_futures::JsFuture::from(e.export_gguf(false, None)).await.unwrap_err();
    assert!(js_sys::Error::from(lora).message().as_string().unwrap().contains("merged GGUF"));
    let out = wasm_bindgen_futures::JsFuture::from(e.export_gguf(true, Some("f32".into()))).await.unwrap();
    let bytes = js_sys::Uint8Array::new(&js_sys::Array::from(&out).get(0)).to_vec();

    // The merged file as a model of its own, with a fresh adapter (B = 0 adds nothing).
    let m = Engine::create().await.map_err(message).unwrap();
    m.load_gguf("merged.gguf", bytes).map_err(message).unwrap();
    run(&m, "lora", 1);
    let merged = engine_eval(&m).await;
    assert!((merged - trained).abs() <= 1e-4 * trained, "merged {merged}, the run's {trained} (base {before})");
}

/// What the page does not apply of a model's files is said: a config.json asking for dropout of
/// the model's own, in the model's description and in the run's notes; tokenizer_config.json's
/// end of sequence is read as the command line reads it; keys of the text no format reads are
/// named.
#[wasm_bindgen_test]
async fn the_page_says_what_of_a_model_it_does_not_apply_in_the_browser() {
    use portalora::web::Engine;
    let e = Engine::create().await.map_err(message).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(include_str!("fixtures/tiny_gpt2/config.json")).unwrap();
    config["resid_pdrop"] = serde_json::json!(0.1);
    let (tokenizer, weights) =
        (include_bytes!("fixtures/tiny_gpt2/tokenizer.json"), include_bytes!("fixtures/tiny_gpt2/model.safetensors"));
    let no_tokenizer = e.load_safetensors("tiny", &config.to_string(), weights.to_vec(), None, Some("{}".into()));
    assert!(message(no_tokenizer.unwrap_err()).contains("tokenizer_config.json without tokenizer.json"));
    let tok_config = Some(r#"{"eos_token": {"content": "<|endoftext|>"}}"#.to_string());
    let desc = e
        .load_safetensors("tiny", &config.to_string(), weights.to_vec(), Some(tokenizer.to_vec()), tok_config)
        .map_err(message)
        .unwrap();
    let desc: serde_json::Value = serde_json::from_str(&desc).unwrap();
    assert!(desc["notes"][0].as_str().unwrap().contains("config.json sets resid_pdrop = 0.1"), "{desc}");
    let text = r#"{"text": "To be, or not to be, that is the question.", "id": 1}"#.to_string() + "\n";
    let c = serde_json::json!({"targets": ["c_attn"], "steps": 1, "text": text.repeat(20), "seq": 8});
    let s: serde_json::Value = serde_json::from_str(&e.start(&c.to_string()).map_err(message).unwrap()).unwrap();
    let notes = s["notes"].to_string();
    assert!(notes.contains("resid_pdrop = 0.1") && notes.contains("keys of the text not read: \\\"id\\\""), "{notes}");
}
