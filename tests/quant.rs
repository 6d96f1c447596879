//! A frozen base stored packed on the GPU (f16 and GGUF's quantizations), dequantized inside
//! the matmul and the embedding lookup. References: the same products in f64 on the CPU over
//! the values GGUF's dequantizer (`io::gguf::dequantize`, independent of the WGSL) gives, and
//! whole models whose f32 weights were replaced by those values; for the dequantizers the `gguf`
//! package's, and for the quantizers llama.cpp's own (`tests/fixtures/gen_quants.py`).

mod common;

use std::collections::BTreeMap;

use portalora::adapter::{AdapterConfig, Method};
use portalora::gpu::{Context, DType, Step};
use portalora::io::gguf::{dequantize, GgmlType};
use portalora::model::gpu::{GpuModel, PlanOptions};
use portalora::model::{Arch, BaseDType, HostTensor, ModelConfig, Weights};
use portalora::ops::embed::embed_forward;
use portalora::ops::matmul::{matmul, Matmul};
use portalora::ops::quant::{pack, quantize};
use portalora::reference;
use portalora::rng::Rng;
use portalora::train::{TrainConfig, Trainer};

const TYPES: [(GgmlType, DType, BaseDType); 11] = [
    (GgmlType::F16, DType::F16, BaseDType::F16),
    (GgmlType::Q8_0, DType::Q8_0, BaseDType::Q8_0),
    (GgmlType::Q4_0, DType::Q4_0, BaseDType::Q4_0),
    (GgmlType::Q4_1, DType::Q4_1, BaseDType::Q4_1),
    (GgmlType::Q5_0, DType::Q5_0, BaseDType::Q5_0),
    (GgmlType::Q5_1, DType::Q5_1, BaseDType::Q5_1),
    (GgmlType::Q2_K, DType::Q2_K, BaseDType::Q2K),
    (GgmlType::Q3_K, DType::Q3_K, BaseDType::Q3K),
    (GgmlType::Q4_K, DType::Q4_K, BaseDType::Q4K),
    (GgmlType::Q5_K, DType::Q5_K, BaseDType::Q5K),
    (GgmlType::Q6_K, DType::Q6_K, BaseDType::Q6K),
];

/// The types `tests/fixtures/quants.gguf` holds, by tensor name.
const FIXTURE_TYPES: [(&str, GgmlType, DType); 7] = [
    ("q2_k", GgmlType::Q2_K, DType::Q2_K),
    ("q3_k", GgmlType::Q3_K, DType::Q3_K),
    ("q4_k", GgmlType::Q4_K, DType::Q4_K),
    ("q5_k", GgmlType::Q5_K, DType::Q5_K),
    ("q6_k", GgmlType::Q6_K, DType::Q6_K),
    ("q5_0", GgmlType::Q5_0, DType::Q5_0),
    ("q5_1", GgmlType::Q5_1, DType::Q5_1),
];

/// Columns of a test matrix of `dtype`: `base` scaled up to whole blocks.
fn cols_for(dtype: DType, base: usize) -> usize {
    if dtype.block() == 256 {
        base.div_ceil(32) * 256
    } else {
        base
    }
}

#[test]
fn every_gguf_type_dequantizes_as_the_gguf_package_does() {
    let g = portalora::io::gguf::Gguf::open(common::fixture("quants.gguf")).unwrap();
    for (name, ty, _) in FIXTURE_TYPES {
        assert_eq!(g.tensor(name).unwrap().ty, ty, "{name}");
        let got = g.tensor_f32(name).unwrap();
        let want = g.tensor_f32(&format!("{name}.f32")).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a.to_bits() == b.to_bits() || (a - b).abs() <= 1e-7 * b.abs(), "{name}[{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn quantizers_make_llama_cpps_blocks() {
    let g = portalora::io::gguf::Gguf::open(common::fixture("quants.gguf")).unwrap();
    for (name, ty, _) in FIXTURE_TYPES {
        let x = g.tensor_f32(&format!("{name}.x")).unwrap();
        let want = g.raw(g.tensor(&format!("{name}.ggml")).unwrap()).unwrap();
        let got = quantize(ty, &x);
        let bytes = ty.block().1 as usize;
        if let Some(b) =
            (0..want.len() / bytes).find(|b| got[b * bytes..(b + 1) * bytes] != want[b * bytes..(b + 1) * bytes])
        {
            let at = (0..bytes).find(|&i| got[b * bytes + i] != want[b * bytes + i]).unwrap();
            panic!(
                "{name}: block {b} differs from llama.cpp's from byte {at}: {:?} vs {:?}",
                &got[b * bytes + at..(b * bytes + at + 8).min((b + 1) * bytes)],
                &want[b * bytes + at..(b * bytes + at + 8).min((b + 1) * bytes)]
            );
        }
        assert_eq!(got.len(), want.len(), "{name}");
    }
}

#[test]
fn packed_loads_of_every_type_equal_the_gguf_package_on_edge_blocks() {
    let Some(ctx) = common::context() else { return };
    let g = portalora::io::gguf::Gguf::open(common::fixture("quants.gguf")).unwrap();
    for (name, ty, dtype) in FIXTURE_TYPES {
        let info = g.tensor(name).unwrap();
        let (rows, cols) = (info.shape[0], info.shape[1]);
        let table = ctx.upload_packed(name, dtype, &[rows, cols], &pack(ty, &g.raw(info).unwrap())).unwrap();
        let want = g.tensor_f32(&format!("{name}.f32")).unwrap();
        let ids = [2u32, 0, 1, 1, 2];
        let id_t = ctx.upload_u32("ids", &[ids.len()], &ids).unwrap();
        let out = ctx.upload_f32("out", &[ids.len(), cols], &vec![f32::NAN; ids.len() * cols]).unwrap();
        let mut s = Step::new();
        embed_forward(&ctx, &mut s, &id_t, &table, &out).unwrap();
        ctx.run(&s).unwrap();
        let got = ctx.read_f32(&out).unwrap();
        let want: Vec<f64> = ids
            .iter()
            .flat_map(|&i| want[i as usize * cols..(i as usize + 1) * cols].iter().map(|&v| v as f64))
            .collect();
        close(&got, &want, 1e-6, &format!("{name} on the GPU"));
    }
}

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(err <= tol * (1.0 + w.abs()), "{what}: [{i}] {g} vs {w} (err {err:e})");
    }
}

#[test]
fn packed_matmul_matches_the_dequantized_product() {
    let Some(ctx) = common::context() else { return };
    if !ctx.features().subgroups {
        panic!("this test needs subgroup operations; adapter {:?} has none", ctx.info().name);
    }
    if ctx.info().name.contains("llvmpipe") {
        // So that the native-f16 comparison below compares two different kernels in CI.
        assert!(ctx.features().shader_f16, "lavapipe offers shader-f16");
    }
    let mut rng = Rng::new(11);
    // (M, rows, cols) of the stored weight; nt reads it as (N, K) = (rows, cols), nn as (K, N).
    for (ggml, dtype, _) in TYPES {
        for &m in &[1usize, 7, 33, 129] {
            for &(rows, cols, trans_b) in &[(36usize, 64usize, true), (4, 96, true), (44, 64, false), (12, 32, false)] {
                let cols = cols_for(dtype, cols);
                let w = rng.vec(rows * cols);
                let raw = quantize(ggml, &w);
                let deq = dequantize(ggml, &raw);
                let b = ctx.upload_packed("W", dtype, &[rows, cols], &pack(ggml, &raw)).unwrap();
                let (k, n) = if trans_b { (cols, rows) } else { (rows, cols) };
                let a_host = rng.vec(m * k);
                let a = ctx.upload_f32("x", &[m, k], &a_host).unwrap();
                let c = ctx.tensor("y", &[m, n], DType::F32).unwrap();
                let prior = rng.vec(m * n);
                for accumulate in [false, true] {
                    ctx.write_f32(&c, &if accumulate { prior.clone() } else { vec![f32::NAN; m * n] }).unwrap();
                    let mut s = Step::new();
                    let opts = Matmul { trans_b, alpha: 0.5, accumulate, ..Matmul::default() };
                    matmul(&ctx, &mut s, &a, &b, &c, opts).unwrap();
                    ctx.run(&s).unwrap();
                    let got = ctx.read_f32(&c).unwrap();
                    if dtype == DType::F16 {
                        // shader-f16's native loads (where the adapter has them: lavapipe does)
                        // and the u32 unpacking give the same bits.
                        ctx.write_f32(&c, &if accumulate { prior.clone() } else { vec![f32::NAN; m * n] }).unwrap();
                        let mut s = Step::new();
                        matmul(&ctx, &mut s, &a, &b, &c, opts.native_f16(false)).unwrap();
                        ctx.run(&s).unwrap();
                        let unpacked = ctx.read_f32(&c).unwrap();
                        let same = got.iter().zip(&unpacked).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "f16 native vs unpacked, m={m} W ({rows}, {cols}) tb={trans_b}");
                    }
                    let mut want = reference::matmul(&a_host, &deq, m, k, n, false, trans_b);
                    for (i, v) in want.iter_mut().enumerate() {
                        *v *= 0.5;
                        if accumulate {
                            *v += prior[i] as f64;
                        }
                    }
                    close(
                        &got,
                        &want,
                        2e-5,
                        &format!("{dtype:?} m={m} W ({rows}, {cols}) tb={trans_b} acc={accumulate}"),
                    );
                }
            }
        }
    }
}

#[test]
fn the_fused_side_product_matches_f64_and_leaves_the_main_one_alone() {
    use portalora::ops::matmul::{can_fuse_side, matmul_side, Side};
    let Some(ctx) = common::context() else { return };
    let s = ctx.subgroup_size().expect("subgroups");
    let mut rng = Rng::new(13);
    for (ggml, dtype) in [(GgmlType::F32, DType::F32), (GgmlType::Q4_1, DType::Q4_1)] {
        for &m in &[1usize, 7, 33, 129] {
            for &(k, n, trans_b) in &[(64usize, 36usize, true), (96, 64, false)] {
                for r in [1usize, 3, s as usize] {
                    let (rows, cols) = if trans_b { (n, k) } else { (k, n) };
                    let w = rng.vec(rows * cols);
                    let (b, deq) = if dtype == DType::F32 {
                        (ctx.upload_f32("W", &[rows, cols], &w).unwrap(), w.clone())
                    } else {
                        let raw = quantize(ggml, &w);
                        (
                            ctx.upload_packed("W", dtype, &[rows, cols], &pack(ggml, &raw)).unwrap(),
                            dequantize(ggml, &raw),
                        )
                    };
                    let x = rng.vec(m * k);
                    let a2h = rng.vec(r * k);
                    let a = ctx.upload_f32("x", &[m, k], &x).unwrap();
                    let a2 = ctx.upload_f32("A", &[r, k], &a2h).unwrap();
                    let c = ctx.upload_f32("y", &[m, n], &vec![f32::NAN; m * n]).unwrap();
                    let c2 = ctx.upload_f32("z", &[m, r], &vec![f32::NAN; m * r]).unwrap();
                    let opts = Matmul { trans_b, ..Matmul::default() };
                    let side = Side { a2: &a2, c2: &c2 };
                    assert!(can_fuse_side(&ctx, &a, &b, &c, opts, side), "{dtype:?} m={m} r={r}");
                    let mut st = Step::new();
                    matmul_side(&ctx, &mut st, &a, &b, &c, opts, side).unwrap();
                    ctx.run(&st).unwrap();
                    let what = format!("{dtype:?} m={m} k={k} n={n} tb={trans_b} r={r}");
                    close(
                        &ctx.read_f32(&c).unwrap(),
                        &reference::matmul(&x, &deq, m, k, n, false, trans_b),
                        2e-5,
                        &what,
                    );
                    close(&ctx.read_f32(&c2).unwrap(), &reference::matmul(&x, &a2h, m, k, r, false, true), 2e-5, &what);
                }
            }
        }
    }
}

#[test]
fn packed_embedding_lookup_matches_the_dequantized_rows() {
    let Some(ctx) = common::context() else { return };
    let mut rng = Rng::new(12);
    let vocab = 67;
    let ids: Vec<u32> = (0..33).map(|i| ((i * 31 + 5) % vocab) as u32).collect();
    for (ggml, dtype, _) in TYPES {
        let dim = cols_for(dtype, 96);
        let table = rng.vec(vocab * dim);
        let raw = quantize(ggml, &table);
        let deq = dequantize(ggml, &raw);
        let t = ctx.upload_packed("table", dtype, &[vocab, dim], &pack(ggml, &raw)).unwrap();
        let id_t = ctx.upload_u32("ids", &[ids.len()], &ids).unwrap();
        let out = ctx.upload_f32("out", &[ids.len(), dim], &vec![f32::NAN; ids.len() * dim]).unwrap();
        let mut s = Step::new();
        embed_forward(&ctx, &mut s, &id_t, &t, &out).unwrap();
        ctx.run(&s).unwrap();
        let got = ctx.read_f32(&out).unwrap();
        let want: Vec<f64> =
            ids.iter().flat_map(|&i| deq[i as usize * dim..(i as usize + 1) * dim].iter().map(|&v| v as f64)).collect();
        close(&got, &want, 0.0, &format!("embed {dtype:?}"));
    }
}

/// A random model whose matrices have rows of whole blocks.
/// A random model whose matrices' rows are whole blocks of `block` elements.
fn random_model(arch: Arch, block: usize) -> Weights {
    let hidden = if block == 256 { 256 } else { 64 };
    let config = ModelConfig {
        norm_eps: 1e-5,
        ..ModelConfig::simple(
            arch,
            96,
            hidden,
            2,
            4,
            if arch == Arch::Llama { 2 } else { 4 },
            if arch == Arch::Llama { 3 * hidden / 2 } else { 2 * hidden },
            64,
        )
    };
    let mut rng = Rng::new(5);
    let mut tensors = BTreeMap::new();
    for (name, shape) in portalora::model::weights::expected_tensors(&config) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 && !name.ends_with("bias") {
            (0..n).map(|_| 1.0 + 0.1 * rng.uniform()).collect()
        } else {
            (0..n).map(|_| 0.2 * rng.uniform()).collect()
        };
        tensors.insert(name, HostTensor { shape, data });
    }
    Weights { config, tensors, raw: BTreeMap::new(), source: "random".into(), left_out: None }
}

/// The same model with every matrix that the packed upload packs replaced by its dequantized
/// values (the f32 twin of the packed model).
fn dequantized(w: &Weights, ty: GgmlType) -> Weights {
    let tensors = w
        .tensors
        .iter()
        .map(|(k, t)| {
            let block = ty.block().0 as usize;
            let packed = t.shape.len() == 2 && t.shape[1] % block == 0 && !k.contains("wpe");
            let data = if packed { dequantize(ty, &quantize(ty, &t.data)) } else { t.data.clone() };
            (k.clone(), HostTensor { shape: t.shape.clone(), data })
        })
        .collect();
    Weights { config: w.config.clone(), tensors, raw: BTreeMap::new(), source: w.source.clone(), left_out: None }
}

fn batch(vocab: usize, b: usize, t: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..b).map(|_| (0..t).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()).collect()
}

fn weight_bytes(ctx: &Context) -> u64 {
    ctx.allocated_bytes().get("weights").copied().unwrap_or(0)
}

#[test]
fn packed_models_train_like_their_dequantized_f32_twins() {
    let Some(ctx) = common::context() else { return };
    for arch in [Arch::Llama, Arch::Gpt2] {
        for (ggml, dtype, base) in TYPES {
            let w = random_model(arch, dtype.block());
            let ids = batch(w.config.vocab_size, 2, 33, 9);
            let twin = dequantized(&w, ggml);
            // Forward loss.
            let before = weight_bytes(&ctx);
            let plan = PlanOptions { base_dtype: Some(base), ..PlanOptions::default() };
            let packed = GpuModel::with_options(&ctx, &w, 2, 33, plan).unwrap();
            let packed_bytes = weight_bytes(&ctx) - before;
            assert!(packed.base_is_packed(), "{arch:?} {dtype:?}");
            // LLaMA's down projection has 384 columns: no whole K-quant blocks, so it stays f32,
            // and the run says so (a note); every other matrix here fits.
            let kept = packed.params.kept_f32(base);
            match (arch, dtype.block()) {
                (Arch::Llama, 256) => {
                    let k = kept.unwrap_or_default();
                    assert!(k.contains("mlp.down_proj.weight [256, 384]") && k.contains("blocks of 256"), "{k}");
                }
                _ => assert_eq!(kept, None, "{arch:?} {dtype:?}"),
            }
            assert_eq!(packed.params.kept_f32(BaseDType::Auto), None);
            let before = weight_bytes(&ctx);
            let f32_model = GpuModel::new(&ctx, &twin, 2, 33).unwrap();
            let f32_bytes = weight_bytes(&ctx) - before;
            assert!(!f32_model.base_is_packed());
            assert!(packed_bytes < f32_bytes, "{arch:?} {dtype:?}: {packed_bytes} vs {f32_bytes} bytes");
            let (lp, n) = packed.loss_sum(&ctx, &ids).unwrap();
            let (lf, _) = f32_model.loss_sum(&ctx, &ids).unwrap();
            assert!(((lp - lf) / lf).abs() < 1e-5, "{arch:?} {dtype:?}: loss {lp} vs {lf} over {n}");
            drop((packed, f32_model));

            // Three LoRA steps on every projection: the packed base's backward (dx = dy·W
            // through the dequantizing kernel) must give the same updates.
            let mut cfg = AdapterConfig::new(Method::Lora);
            cfg.targets = portalora::adapter::all_targets(arch);
            cfg.rank = 4;
            let tc = TrainConfig { lr: 1e-2, base_dtype: base, ..TrainConfig::default() };
            let mut tp = Trainer::new(&ctx, &w, 2, 33, &cfg, &tc, None).unwrap();
            let tc32 = TrainConfig { base_dtype: BaseDType::F32, ..tc.clone() };
            let mut tf = Trainer::new(&ctx, &twin, 2, 33, &cfg, &tc32, None).unwrap();
            for step in 0..3 {
                let ids = batch(w.config.vocab_size, 2, 33, 20 + step);
                let a = tp.train_step(&ctx, &ids).unwrap().loss;
                let b = tf.train_step(&ctx, &ids).unwrap().loss;
                assert!(((a - b) / b).abs() < 1e-5, "{arch:?} {dtype:?} step {step}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn the_smollm2_gguf_keeps_its_quantized_bytes_and_its_loss() {
    let Some(ctx) = common::context() else { return };
    let Some(path) = common::smollm2_path() else { return };
    let w = portalora::model::load_model(&path).unwrap();
    // Q4_1 projections and a Q8_0 token table, kept as the file has them.
    assert_eq!(w.raw["model.layers.0.self_attn.q_proj.weight"].ty, GgmlType::Q4_1);
    assert_eq!(w.raw["model.embed_tokens.weight"].ty, GgmlType::Q8_0);
    let ids = vec![vec![1u32, 504, 3458, 28, 260, 3024, 282, 253, 1345, 30, 2, 9, 12, 49151, 0, 77]];
    let before = weight_bytes(&ctx);
    let plan = PlanOptions { base_dtype: Some(BaseDType::Auto), ..PlanOptions::default() };
    let q = GpuModel::with_options(&ctx, &w, 1, 16, plan).unwrap();
    let q_bytes = weight_bytes(&ctx) - before;
    let (lq, _) = q.loss_sum(&ctx, &ids).unwrap();
    drop(q);
    let before = weight_bytes(&ctx);
    let f = GpuModel::new(&ctx, &w, 1, 16).unwrap();
    let f_bytes = weight_bytes(&ctx) - before;
    let (lf, _) = f.loss_sum(&ctx, &ids).unwrap();
    // The same weights (the f32 copy is the file's values dequantized): the same loss.
    assert!(((lq - lf) / lf).abs() < 1e-5, "loss {lq} (as stored) vs {lf} (f32)");
    let ratio = q_bytes as f64 / f_bytes as f64;
    assert!(ratio <= 0.2, "weights as stored take {q_bytes} bytes, {ratio:.3} of f32's {f_bytes}");
}

#[test]
fn what_a_packed_base_cannot_do_is_refused_clearly() {
    let Some(ctx) = common::context() else { return };
    let w = random_model(Arch::Llama, 32);
    let mut cfg = AdapterConfig::new(Method::DeltaLora);
    cfg.targets = vec!["q_proj".into()];
    let tc = TrainConfig { base_dtype: BaseDType::Q4_0, ..TrainConfig::default() };
    let e = Trainer::new(&ctx, &w, 1, 8, &cfg, &tc, None).err().expect("delta-lora on q4_0 must fail").to_string();
    assert!(e.contains("delta-lora") && e.contains("--base-dtype f32"), "{e}");
    // Merging into a packed base.
    cfg.method = Method::Lora;
    let mut t = Trainer::new(&ctx, &w, 1, 8, &cfg, &tc, None).unwrap();
    let e = t.model.merge(&ctx).expect_err("merge into q4_0 must fail").to_string();
    assert!(e.contains("quantized") && e.contains("--base-dtype f32"), "{e}");
    let e = "iq4_xs".parse::<BaseDType>().expect_err("unknown dtype").to_string();
    assert!(e.contains("iq4_xs") && e.contains("q4_k"), "{e}");
    assert_eq!("Q4_K".parse::<BaseDType>().unwrap(), BaseDType::Q4K);
}

#[test]
fn a_run_on_the_quantized_smollm2_samples_with_its_adapter() {
    let Some(ctx) = common::context() else { return };
    let Some(path) = common::smollm2_path() else { return };
    let dir = std::env::temp_dir().join(format!("portalora-quant-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(&text, "To be, or not to be, that is the question. ".repeat(30)).unwrap();
    let mut cfg = portalora::finetune::RunConfig::new(&path, dir.join("out"));
    cfg.data = Some(text);
    cfg.adapter = AdapterConfig { targets: vec!["q_proj".into(), "v_proj".into()], ..AdapterConfig::new(Method::Lora) };
    cfg.train = TrainConfig { lr: 1e-3, ..TrainConfig::default() };
    cfg.batch = 1;
    cfg.seq = 16;
    cfg.steps = Some(2);
    cfg.val_fraction = 0.2;
    cfg.prompts = vec!["To be".into()];
    cfg.sample_tokens = 4;
    let s = portalora::finetune::run(&ctx, &cfg, false, &mut |_| {}).unwrap();
    // The base stayed quantized; the samples after training come from an f32 copy with the
    // saved adapter merged.
    assert_eq!(s.samples_after.len(), 1);
    assert!(s.train_loss.iter().all(|(_, l)| l.is_finite()));
    assert!(dir.join("out/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
