//! Fine-tuning runs as people use them: the data pipeline (packing, prompt masking, split,
//! seeded order), a short run that lowers the validation loss, the loss plot, gradient
//! accumulation, configs from TOML, and a run killed with SIGKILL that resumes to exactly the
//! uninterrupted run's losses and adapter.

mod common;

use std::path::Path;

use common::{bin, context, fixture, tmp};
use portalora::adapter::{AdapterConfig, Method};
use portalora::data::{self, Order};
use portalora::finetune::{run, RunConfig};
use portalora::io::tokenizer::Tokenizer;
use portalora::train::{Batch, TrainConfig, Trainer};

/// The tiny GPT-2's character-level tokenizer (tests/fixtures/gen_tiny_tokenizer.py).
fn tiny_tokenizer() -> Tokenizer {
    Tokenizer::for_model(&fixture("tiny_gpt2")).unwrap()
}

const VERSE: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";

#[test]
fn text_is_packed_into_rows_with_the_tail_dropped() {
    let tok = tiny_tokenizer();
    let dir = tmp("pack");
    let file = dir.join("a.txt");
    std::fs::write(&file, VERSE).unwrap();
    let ds = data::load(&file, &tok, 8, 0.0, 1).unwrap();
    let n = VERSE.chars().count() + 1; // + end-of-text
    assert_eq!(ds.summary.tokens, n);
    // A row's first token has nothing before it in the row: never a target.
    assert_eq!(ds.summary.target_tokens, n - n / 8);
    assert_eq!(ds.train.len(), n / 8);
    // One document over several rows: each row is a piece of it, positions from 0.
    assert!(ds.train.iter().all(|r| r.pos == (0..8).collect::<Vec<u32>>() && !r.predict[0]));
    assert_eq!(ds.summary.dropped_tokens, n % 8);
    let flat: Vec<u32> = ds.train.iter().flat_map(|r| r.ids.clone()).collect();
    assert_eq!(&flat[..], &tok.encode(VERSE).unwrap()[..flat.len()], "rows are the token stream in order");
    // A folder: every file, sorted, each a document ended by end-of-text.
    std::fs::write(dir.join("b.txt"), "Hello there.").unwrap();
    let ds = data::load(&dir, &tok, 4, 0.0, 1).unwrap();
    assert_eq!((ds.summary.files, ds.summary.documents), (2, 2));
    assert_eq!(ds.summary.tokens, n + "Hello there.".len() + 1);
    // The second document starts at position 0, is not a target there, and sees nothing before.
    let stream: Vec<(u32, bool)> = ds.train.iter().flat_map(|r| r.pos.iter().copied().zip(r.predict.clone())).collect();
    let b_start = n; // a.txt's tokens and its end-of-text come first
    if b_start < stream.len() {
        assert_eq!(stream[b_start], (0, false), "b.txt's first token");
    }
    for r in &ds.train {
        assert!(r.pos.windows(2).all(|w| w[1] == 0 || w[1] == w[0] + 1) && r.pos[0] == 0, "{:?}", r.pos);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn jsonl_prompts_are_masked_out_of_the_loss() {
    let tok = tiny_tokenizer();
    let dir = tmp("jsonl");
    // One format per file: prompt/completion pairs in one, a text in the next (read in order).
    let (folder, file) = (dir.join("both"), dir.join("d.jsonl"));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("a.jsonl"), "{\"prompt\": \"Q: who?\\nA:\", \"completion\": \" Hamlet.\"}\n\n").unwrap();
    std::fs::write(folder.join("b.jsonl"), "{\"text\": \"abc\"}\n").unwrap();
    let ds = data::load(&folder, &tok, 2, 0.0, 0).unwrap();
    let predict: Vec<bool> = ds.train.iter().flat_map(|r| r.predict.clone()).collect();
    let (p, c) = ("Q: who?\nA:".len(), " Hamlet.".len());
    let mut want = vec![false; p];
    want.extend(vec![true; c + 1]); // the completion and its end-of-text
    want.push(false); // "a": a document's first token has nothing before it in its document
    want.extend(vec![true; 3]); // "bc" + end-of-text
                                // The dropped tail counts as the stream has it; in rows, nor is a row's first token (rows of 2).
    let tail: usize = want[predict.len()..].iter().filter(|&&w| w).count();
    for (i, w) in want.iter_mut().enumerate() {
        *w &= i % 2 != 0;
    }
    assert_eq!(predict, want[..predict.len()]);
    assert_eq!(ds.summary.target_tokens, predict.iter().filter(|&&w| w).count() + tail);
    // Formats mixed in one file, missing fields and bad lines name the file and line.
    std::fs::write(&file, "{\"prompt\": \"Q\", \"completion\": \"A\"}\n{\"text\": \"abc\"}\n").unwrap();
    let err = data::load(&file, &tok, 2, 0.0, 0).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:2") && err.contains("a file holds one format"), "{err}");
    std::fs::write(&file, "{\"text\": \"ok\"}\n{\"prompt\": \"no completion\"}\n").unwrap();
    let err = data::load(&file, &tok, 2, 0.0, 0).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:2") && err.contains("completion"), "{err}");
    std::fs::write(&file, "{\"text\": 5}\n").unwrap();
    let err = data::load(&file, &tok, 2, 0.0, 0).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:1") && err.contains("not a string"), "{err}");
    std::fs::write(dir.join("bad.txt"), [0x66, 0x6f, 0xff, 0x6f]).unwrap();
    let err = data::load(&dir.join("bad.txt"), &tok, 2, 0.0, 0).unwrap_err().to_string();
    assert!(err.contains("bad.txt") && err.contains("UTF-8") && err.contains("offset 2"), "{err}");
    std::fs::write(dir.join("empty.txt"), "").unwrap();
    let err = data::load(&dir.join("empty.txt"), &tok, 2, 0.0, 0).unwrap_err().to_string();
    assert!(err.contains("nothing to train on"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn split_sizes_and_seeded_orders() {
    let rows: Vec<data::Row> =
        (0..40).map(|i| data::Row { ids: vec![i, i], predict: vec![true; 2], pos: vec![0, 1] }).collect();
    for (frac, val) in [(0.0, 0), (0.1, 4), (0.25, 10), (0.01, 1), (0.99, 39)] {
        let ds = data::split(rows.clone(), frac, 3, data::DataSummary::default());
        assert_eq!((ds.train.len(), ds.val.len()), (40 - val, val), "fraction {frac}");
        let mut all: Vec<u32> = ds.train.iter().chain(&ds.val).map(|r| r.ids[0]).collect();
        all.sort();
        assert_eq!(all, (0..40).collect::<Vec<_>>(), "a split loses or repeats no row");
    }
    let a = data::split(rows.clone(), 0.25, 3, data::DataSummary::default());
    let b = data::split(rows.clone(), 0.25, 3, data::DataSummary::default());
    let c = data::split(rows, 0.25, 4, data::DataSummary::default());
    assert_eq!(a.val, b.val, "the same seed splits the same way");
    assert_ne!(a.val, c.val, "another seed splits another way");
    assert_eq!(data::permutation(50, 9), data::permutation(50, 9));
    assert_ne!(data::permutation(50, 9), data::permutation(50, 10));
    let mut o = Order::new(10, 5, true);
    let epoch0: Vec<usize> = (0..10).map(|k| o.at(k).0).collect();
    let epoch1: Vec<usize> = (10..20).map(|k| o.at(k).0).collect();
    let mut sorted = epoch0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "an epoch reads every row once");
    assert_ne!(epoch0, epoch1, "each epoch is reshuffled");
    let mut again = Order::new(10, 5, true);
    assert_eq!(again.at(13), o.at(13), "the order is a function of (seed, rows read)");
    let mut plain = Order::new(4, 5, false);
    assert_eq!((0..6).map(|k| plain.at(k).0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 0, 1]);
}

fn tiny_run(out: &Path, text: &Path, steps: u64) -> RunConfig {
    let mut cfg = RunConfig::new(fixture("tiny_gpt2"), out);
    cfg.data = Some(text.to_path_buf());
    cfg.adapter = AdapterConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["c_attn".into(), "c_proj".into(), "c_fc".into()],
        ..AdapterConfig::new(Method::Lora)
    };
    cfg.train = TrainConfig { lr: 1e-2, ..TrainConfig::default() };
    cfg.batch = 4;
    cfg.seq = 32;
    cfg.steps = Some(steps);
    cfg.val_fraction = 0.2;
    cfg.eval_every = 10;
    cfg.prompts = vec!["To be".into()];
    cfg.sample_tokens = 12;
    cfg
}

#[test]
fn a_short_run_lowers_the_validation_loss_and_draws_it() {
    let Some(ctx) = context() else { return };
    let dir = tmp("learn");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(40)).unwrap();
    let out = dir.join("out");
    let cfg = tiny_run(&out, &text, 40);
    let mut events = 0;
    let s = run(&ctx, &cfg, false, &mut |_| events += 1).unwrap();
    let (before, after) = (s.val_before.unwrap(), s.val_after.unwrap());
    assert!(after < 0.8 * before, "validation loss {before} → {after}: a repeated text must be learned");
    assert_eq!(s.train_loss.len(), 40);
    assert!(events > 40);
    assert_eq!(s.samples_before.len(), 1);
    assert_eq!(s.samples_after.len(), 1);
    assert!(out.join("adapter_model.safetensors").exists() && out.join("adapter_config.json").exists());
    // The loss curve is a well-formed SVG with both series.
    let svg = std::fs::read_to_string(&s.plot).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("loss.svg must be well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert_eq!(
        doc.descendants().filter(|n| n.has_tag_name("polyline")).count(),
        3,
        "raw and smoothed train loss, validation loss"
    );
    // The log: one line per step and per evaluation.
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 40);
    assert_eq!(log.lines().filter(|l| l.contains("val_loss")).count(), 5); // steps 0, 10, 20, 30, 40
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reading_losses_every_few_steps_changes_nothing() {
    let Some(ctx) = context() else { return };
    let dir = tmp("loss-every");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(20)).unwrap();
    let mut runs = Vec::new();
    for every in [1usize, 4] {
        let out = dir.join(format!("every{every}"));
        let mut cfg = tiny_run(&out, &text, 13);
        cfg.train.loss_every = every;
        cfg.eval_every = 5;
        cfg.save_every = 6;
        cfg.prompts.clear();
        let mut logged = Vec::new();
        let s = run(&ctx, &cfg, false, &mut |e| {
            if let portalora::finetune::Event::Step { stats, .. } = e {
                logged.push(stats.step)
            }
        })
        .unwrap();
        assert_eq!(logged, (1..=13).collect::<Vec<u64>>(), "every step reported once, in order (every {every})");
        let log = std::fs::read_to_string(&s.log).unwrap();
        assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 13);
        runs.push((s.train_loss, s.val_loss, std::fs::read(out.join("adapter_model.safetensors")).unwrap()));
    }
    // Same seed, same device: bit-identical losses and adapter whether read every step or not.
    assert_eq!(runs[0].0, runs[1].0, "train losses");
    assert_eq!(runs[0].1, runs[1].1, "validation losses");
    assert!(runs[0].2 == runs[1].2, "adapter bytes differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gradient_accumulation_equals_one_larger_batch() {
    let Some(ctx) = context() else { return };
    let w = portalora::model::load_model(fixture("tiny_gpt2")).unwrap();
    let mut cfg = AdapterConfig::new(Method::Lora);
    cfg.rank = 4;
    cfg.targets = vec!["c_attn".into(), "mlp.c_proj".into()];
    // B non-zero from the start: make both runs start from the same trained-looking adapter.
    let rows: Vec<Vec<u32>> = (0..2).map(|r| (0..9).map(|i| ((r * 31 + i * 7) % 67) as u32).collect()).collect();
    let mask: Vec<Vec<bool>> = vec![vec![true, true, false, true, true, true, false, true, true]; 2];
    let tc = TrainConfig { lr: 5e-3, max_grad_norm: 0.5, ..TrainConfig::default() };
    let mut one = Trainer::new(&ctx, &w, 2, 9, &cfg, &tc, None).unwrap();
    let mut two = Trainer::new(&ctx, &w, 1, 9, &cfg, &TrainConfig { grad_accum: 2, ..tc.clone() }, None).unwrap();
    for _ in 0..3 {
        let a = one.train_step_batches(&ctx, &[Batch { ids: &rows, predict: Some(&mask), positions: None }]).unwrap();
        let b = two
            .train_step_batches(
                &ctx,
                &[
                    Batch { ids: &rows[..1], predict: Some(&mask[..1]), positions: None },
                    Batch { ids: &rows[1..], predict: Some(&mask[1..]), positions: None },
                ],
            )
            .unwrap();
        assert!((a.loss - b.loss).abs() < 1e-5 * a.loss, "loss {} vs accumulated {}", a.loss, b.loss);
    }
    let ta = pollster::block_on(portalora::adapter::peft::export(&ctx, one.adapter())).unwrap();
    let tb = pollster::block_on(portalora::adapter::peft::export(&ctx, two.adapter())).unwrap();
    for (k, a) in &ta {
        let err =
            portalora::reference::max_rel_error(&tb[k].data, &a.data.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(err < 1e-5, "{k}: {err:e}");
    }
}

fn step_losses(log: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// Trains to `out` with the CLI; with `kill_after`, sends SIGKILL once that many steps are logged
/// and resumes with `--resume out`.
fn train_cli(args: &[String], out: &Path, kill_after: Option<usize>) {
    let mut cmd = bin();
    cmd.arg("train").args(args).arg("--out").arg(out).stdout(std::process::Stdio::null());
    match kill_after {
        None => assert!(cmd.status().unwrap().success()),
        Some(n) => {
            let mut child = cmd.spawn().unwrap();
            let log = out.join("log.jsonl");
            let t0 = std::time::Instant::now();
            while step_losses(&log).len() < n {
                assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
                assert!(t0.elapsed().as_secs() < 120, "no progress");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            assert!(out.join("checkpoint/state.json").exists() || out.join("checkpoint.old/state.json").exists());
            let st = bin().arg("train").arg("--resume").arg(out).stdout(std::process::Stdio::null()).status().unwrap();
            assert!(st.success());
        }
    }
}

fn resume_case(name: &str, data_args: Vec<String>, steps: usize, kill_after: usize) {
    if context().is_none() {
        return;
    }
    let dir = tmp(name);
    let mut args: Vec<String> =
        ["--model", fixture("tiny_gpt2").to_str().unwrap(), "--targets", "c_attn,c_fc", "--rank", "4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(data_args.into_iter().map(|a| a.replace("DIR", dir.to_str().unwrap())));
    args.extend(
        ["--lr", "1e-2", "--dropout", "0.1", "--steps", &steps.to_string(), "--save-every", "7", "--seed", "3"]
            .iter()
            .map(|s| s.to_string()),
    );
    let (a, b) = (dir.join("a"), dir.join("b"));
    train_cli(&args, &a, None);
    train_cli(&args, &b, Some(kill_after));
    let (la, lb) = (step_losses(&a.join("log.jsonl")), step_losses(&b.join("log.jsonl")));
    assert_eq!(la.len(), steps);
    assert_eq!(la, lb, "{name}: the resumed run's per-step losses differ from the uninterrupted run's");
    let read = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b), "{name}: the resumed run's adapter differs");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_killed_run_resumes_exactly_with_data() {
    let text = VERSE.repeat(30);
    let dir = tmp("verse");
    std::fs::write(dir.join("verse.txt"), text).unwrap();
    let data = vec!["--data".into(), dir.join("verse.txt").to_str().unwrap().into(), "--seq".into(), "16".into()];
    let extra =
        vec!["--batch".into(), "3".into(), "--grad-accum".into(), "2".into(), "--eval-every".into(), "5".into()];
    resume_case("resume-data", [data, extra].concat(), 60, 23);
}

#[test]
fn a_killed_run_resumes_exactly_with_ids() {
    let dir = tmp("ids");
    let rows: Vec<Vec<u32>> = (0..3).map(|r| (0..10).map(|i| ((r * 13 + i * 5) % 67) as u32).collect()).collect();
    std::fs::write(dir.join("ids.json"), serde_json::json!({ "input_ids": rows }).to_string()).unwrap();
    resume_case("resume-ids", vec!["--ids".into(), dir.join("ids.json").to_str().unwrap().into()], 50, 30);
}

#[test]
fn a_toml_config_is_read_and_flags_override_it() {
    if context().is_none() {
        return;
    }
    let dir = tmp("toml");
    std::fs::write(dir.join("verse.txt"), VERSE.repeat(10)).unwrap();
    let cfg = format!(
        "model = {:?}\ndata = {:?}\nmethod = \"lora-fa\"\ntargets = [\"c_attn\", \"c_fc\"]\nrank = 2\nlr = 1e-3\nsteps = 5\nseq = 16\nrslora = true\nprompt = [\"To\", \"be\"]\nsample_tokens = 3\nactivations = \"f16\"\nno_shuffle = false\nrecompute_mlp = true\n",
        fixture("tiny_gpt2").to_str().unwrap(),
        dir.join("verse.txt").to_str().unwrap()
    );
    std::fs::write(dir.join("run.toml"), cfg).unwrap();
    let out = dir.join("out");
    let st = bin()
        .args(["train", "--config", dir.join("run.toml").to_str().unwrap(), "--steps", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert_eq!(step_losses(&out.join("log.jsonl")).len(), 2, "--steps on the command line overrides the file's");
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["adapter"]["method"], "lora-fa");
    assert_eq!(run["adapter"]["rank"], 2);
    assert_eq!(run["adapter"]["rslora"], true);
    assert_eq!(run["prompts"], serde_json::json!(["To", "be"]));
    assert_eq!(run["train"]["activations_f16"], true);
    assert_eq!(run["train"]["recompute_mlp"], true);
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(stdout.contains("samples after training"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let Some(ctx) = context() else { return };
    let dir = tmp("nan");
    // The tiny GPT-2 with the embedding row of 'Q' made NaN: any row holding a 'Q' has a NaN loss.
    // (The fixture ties its head to the embedding; this copy gets an untied, clean head.)
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(fixture("tiny_gpt2").join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    // Untied head (a clean copy of the table), so that only inputs holding 'Q' go NaN.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_gpt2").join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = serde_json::Value::Bool(false);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let q = Tokenizer::for_model(&model).unwrap().encode("Q").unwrap()[0] as usize;
    let bytes = std::fs::read(fixture("tiny_gpt2/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name.ends_with("wte.weight") {
            owned.push(("lm_head.weight".to_string(), view.shape().to_vec(), data.clone()));
            let cols = view.shape()[1];
            for c in 0..cols {
                let at = 4 * (q * cols + c);
                data[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
        owned.push((name.to_string(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    std::fs::write(model.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    // Clean verse first; 'Q' only in the last rows, read in order.
    let text = dir.join("text.txt");
    std::fs::write(&text, VERSE.repeat(6) + &"Quiet Queen Q. ".repeat(8)).unwrap();
    let out = dir.join("out");
    let mut cfg = RunConfig::new(&model, &out);
    cfg.data = Some(text);
    cfg.adapter = AdapterConfig { rank: 2, targets: vec!["c_attn".into()], ..AdapterConfig::new(Method::Lora) };
    cfg.train = TrainConfig { lr: 1e-2, loss_every: 3, ..TrainConfig::default() };
    cfg.batch = 2;
    cfg.seq = 16;
    cfg.steps = Some(100);
    cfg.val_fraction = 0.0;
    cfg.shuffle = false;
    cfg.save_every = 2;
    let err = run(&ctx, &cfg, false, &mut |_| {}).expect_err("a NaN loss must stop the run").to_string();
    assert!(err.contains("the loss (NaN)") && err.contains("is intact"), "{err}");
    let step: u64 = err.split("step ").nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
    // The last checkpoint is from before the failing step and is whole: it resumes.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap()).unwrap();
    let saved = state["step"].as_u64().unwrap();
    assert!(saved < step && saved >= 2, "checkpoint of step {saved}, failure at {step}");
    assert!(err.contains(&format!("checkpoint of step {saved}")), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists(), "no final adapter from a failed run");
    let ckpt = std::fs::read(out.join("checkpoint/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&ckpt).unwrap();
    for (name, v) in st.tensors() {
        assert!(
            v.data().chunks_exact(4).all(|c| f32::from_le_bytes(c.try_into().unwrap()).is_finite()),
            "{name} in the checkpoint is not finite"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kills_at_random_moments_and_during_checkpoint_writes_lose_nothing() {
    if context().is_none() {
        return;
    }
    let dir = tmp("random-kill");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(30)).unwrap();
    let args: Vec<String> = [
        "--model",
        fixture("tiny_gpt2").to_str().unwrap(),
        "--targets",
        "c_attn",
        "--rank",
        "2",
        "--data",
        text.to_str().unwrap(),
        "--batch",
        "2",
        "--seq",
        "16",
        "--lr",
        "1e-2",
        "--dropout",
        "0.1",
        "--steps",
        "24",
        "--save-every",
        "1",
        "--eval-every",
        "8",
        "--seed",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (a, b) = (dir.join("a"), dir.join("b"));
    train_cli(&args, &a, None);
    let has_checkpoint =
        |out: &Path| out.join("checkpoint/state.json").exists() || out.join("checkpoint.old/state.json").exists();
    let mut rng = portalora::rng::Rng::new(99);
    let mut kills = 0;
    let mut finished = false;
    for round in 0..12 {
        let mut cmd = bin();
        if has_checkpoint(&b) {
            cmd.arg("train").arg("--resume").arg(&b);
        } else {
            let _ = std::fs::remove_dir_all(&b);
            cmd.arg("train").args(&args).arg("--out").arg(&b);
        }
        let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let t0 = std::time::Instant::now();
        // Even rounds: after 2–8 more logged steps plus 0–40 ms (anywhere in a step or a
        // checkpoint write). Odd rounds: the moment a checkpoint replacing an existing one is
        // being written (checkpoint.tmp/ present).
        let logged = step_losses(&b.join("log.jsonl")).len();
        let wait_steps = 2 + (rng.next_u64() % 7) as usize;
        let jitter = std::time::Duration::from_millis(rng.next_u64() % 40);
        let mut reached: Option<std::time::Instant> = None;
        let done = loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "round {round}: the run failed");
                break true;
            }
            if round % 2 == 1 && b.join("checkpoint.tmp").exists() && has_checkpoint(&b) {
                break false;
            }
            // (Odd rounds fall back to a step count when no write was caught in the act.)
            let wait = if round % 2 == 1 { 10 } else { wait_steps };
            if reached.is_none() && step_losses(&b.join("log.jsonl")).len() >= logged + wait {
                reached = Some(std::time::Instant::now());
            }
            if reached.is_some_and(|r| r.elapsed() >= jitter) {
                break false;
            }
            assert!(t0.elapsed().as_secs() < 300, "no progress");
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        if done {
            finished = true;
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    if !finished {
        assert!(has_checkpoint(&b), "12 kills and no checkpoint yet");
        let st = bin().arg("train").arg("--resume").arg(&b).stdout(std::process::Stdio::null()).status().unwrap();
        assert!(st.success());
    }
    assert!(kills >= 3, "only {kills} kills landed");
    assert_eq!(step_losses(&a.join("log.jsonl")), step_losses(&b.join("log.jsonl")), "per-step losses");
    let read = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
    assert!(read(&a) == read(&b), "the adapter after {kills} kills differs from the uninterrupted run's");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_lost_device_ends_the_run_with_its_checkpoint_intact() {
    let Some(ctx) = context() else { return };
    let dir = tmp("lost");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(20)).unwrap();
    let out = dir.join("out");
    let mut cfg = tiny_run(&out, &text, 20);
    cfg.save_every = 4;
    cfg.prompts.clear();
    let err = run(&ctx, &cfg, false, &mut |e| {
        // The GPU goes away right after the step-8 checkpoint (a driver reset, a removed eGPU).
        if let portalora::finetune::Event::Checkpoint { step: 8, .. } = e {
            ctx.destroy();
        }
    })
    .expect_err("a lost device must end the run")
    .to_string();
    assert!(err.contains("device was lost"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"].as_u64(), Some(8), "the checkpoint before the loss is the one on disk");
    assert!(!out.join("adapter_model.safetensors").exists());
    // And it resumes on a new device.
    let ctx2 = context().unwrap();
    let s = run(&ctx2, &cfg, true, &mut |_| {}).unwrap();
    assert_eq!(s.train_loss.len(), 20);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_same_seed_on_the_same_device_gives_bit_identical_runs() {
    let Some(ctx) = context() else { return };
    let dir = tmp("determinism");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(20)).unwrap();
    let mut runs = Vec::new();
    for i in 0..2 {
        let out = dir.join(format!("run{i}"));
        let mut cfg = tiny_run(&out, &text, 12);
        cfg.adapter.dropout = 0.1; // the dropout masks come from the seed too
        cfg.prompts.clear();
        let s = run(&ctx, &cfg, false, &mut |_| {}).unwrap();
        let bits: Vec<u64> = s.train_loss.iter().map(|(_, l)| l.to_bits()).collect();
        runs.push((bits, std::fs::read(out.join("adapter_model.safetensors")).unwrap()));
    }
    assert_eq!(runs[0].0, runs[1].0, "per-step losses differ between two runs with the same seed");
    assert!(runs[0].1 == runs[1].1, "adapters differ between two runs with the same seed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--no-packing`: one document per row, cut into pieces of at most --seq tokens, padded with
/// tokens that are never targets; on the GPU a padded row's loss equals its document's alone.
#[test]
fn one_document_per_row_pads_and_scores_only_the_document() {
    let tok = tiny_tokenizer();
    let dir = tmp("no_packing");
    let file = dir.join("d.jsonl");
    std::fs::write(&file, "{\"text\": \"To be, or not\"}\n{\"text\": \"that is the question: whether 'tis nobler\"}\n")
        .unwrap();
    let opts = data::ChatOptions::default();
    let seq = 24;
    let ds = data::load_with(&file, &tok, &opts, data::Packing::PerDocument, seq, 0.0, 0).unwrap();
    let (docs, _) = data::tokenized_documents(&file, &tok, &opts).unwrap();
    let (short, long) = (&docs[0], &docs[1]);
    assert!(short.ids.len() < seq && long.ids.len() > seq, "{} {}", short.ids.len(), long.ids.len());
    // The short document, then the long one in two pieces.
    assert_eq!(ds.train.len(), 3);
    assert_eq!(&ds.train[0].ids[..short.ids.len()], &short.ids[..]);
    assert!(ds.train[0].predict[short.ids.len()..].iter().all(|&p| !p), "padding is never a target");
    assert_eq!(&ds.train[1].ids[..], &long.ids[..seq]);
    assert_eq!(&ds.train[2].ids[..long.ids.len() - seq], &long.ids[seq..]);
    let pad = (seq - short.ids.len()) + (2 * seq - long.ids.len());
    assert_eq!(ds.summary.padding_tokens, pad);
    assert!(ds.summary.to_string().contains(&format!("{pad} padding tokens")));
    let Some(ctx) = context() else { return };
    let w = portalora::model::load_model(fixture("tiny_gpt2")).unwrap();
    let n = short.ids.len();
    let alone = portalora::model::gpu::GpuModel::new(&ctx, &w, 1, n).unwrap();
    let (want, want_n) = alone.loss_sum_masked(&ctx, std::slice::from_ref(&short.ids), None).unwrap();
    let padded = portalora::model::gpu::GpuModel::new(&ctx, &w, 1, seq).unwrap();
    let row = &ds.train[0];
    let (got, got_n) =
        padded.loss_sum_masked(&ctx, std::slice::from_ref(&row.ids), Some(std::slice::from_ref(&row.predict))).unwrap();
    assert_eq!(got_n, want_n);
    assert!((got - want).abs() <= 1e-5 * want.abs(), "padded row {got} vs the document alone {want}");
    std::fs::remove_dir_all(&dir).unwrap();
}
