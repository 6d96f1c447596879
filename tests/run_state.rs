//! The run state the command line and the page share (`portalora::run`): one set of defaults,
//! the same in `portalora train --help`, `RunConfig::new`, the adapter's and the optimizer's
//! configurations; and the walk over the rows (each epoch a permutation of the training rows,
//! reshuffled per epoch; a resumed run continues the uninterrupted one's order exactly; the run's
//! length from epochs; evaluations when due), checked against counts made here.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::BTreeSet;

use portalora::adapter::{AdapterConfig, Method};
use portalora::data::Row;
use portalora::finetune::RunConfig;
use portalora::run::{unused_by_method, Plan, RunData, RunDefaults, RunState, DEFAULTS};
use portalora::train::{Schedule, TrainConfig};

/// `n` rows whose first token names them.
fn rows(n: usize, seq: usize) -> Vec<Row> {
    (0..n).map(|i| Row { ids: vec![i as u32; seq], predict: vec![true; seq], pos: (0..seq as u32).collect() }).collect()
}

fn data(train: usize, val: usize) -> RunData {
    RunData { train: rows(train, 5), val: rows(val, 5), ..RunData::default() }
}

/// Which training rows each step reads, by name.
fn walk(run: &mut RunState, steps: u64) -> Vec<Vec<u32>> {
    (0..steps).map(|_| run.next_step().iter().flat_map(|m| m.ids.iter().map(|r| r[0])).collect::<Vec<u32>>()).collect()
}

#[test]
fn the_library_and_the_command_line_share_one_set_of_defaults() {
    let cfg = RunConfig::new("m.gguf", "out");
    assert_eq!(
        (cfg.batch, cfg.seq, cfg.val_fraction, cfg.val_rows, cfg.eval_every, cfg.save_every, cfg.sample_tokens),
        (
            DEFAULTS.batch,
            DEFAULTS.seq,
            DEFAULTS.val_fraction,
            DEFAULTS.val_rows,
            DEFAULTS.eval_every,
            DEFAULTS.save_every,
            DEFAULTS.sample_tokens
        )
    );
    let a = AdapterConfig::new(DEFAULTS.method.parse().unwrap());
    assert_eq!((a.rank, a.alpha, a.dropout, a.seed), (DEFAULTS.rank, DEFAULTS.alpha, DEFAULTS.dropout, DEFAULTS.seed));
    assert_eq!(AdapterConfig::new(Method::Vera).rank, DEFAULTS.vera_rank);
    let d = AdapterConfig::new(Method::DeltaLora);
    assert_eq!((d.delta_lambda, d.delta_warmup), (DEFAULTS.delta_lambda, DEFAULTS.delta_warmup));
    let t = TrainConfig::default();
    assert_eq!(
        (t.lr, t.max_grad_norm, t.warmup_steps, t.lr_ratio, t.grad_accum),
        (DEFAULTS.lr, DEFAULTS.max_grad_norm, DEFAULTS.warmup_steps, DEFAULTS.lr_ratio, DEFAULTS.grad_accum)
    );
    assert_eq!(DEFAULTS.schedule.parse::<Schedule>().unwrap(), t.schedule);
    assert_eq!(DEFAULTS.train_on.parse::<portalora::data::TrainOn>().unwrap(), Default::default());

    // `portalora train --help` states the same values, one option at a time.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portalora")).args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let block = |flag: &str| -> String {
        let start = help.find(&format!("--{flag} ")).unwrap_or_else(|| panic!("--{flag} is not in the help"));
        let rest = &help[start..];
        rest[..rest[2..].find("\n  -").map(|e| e + 2).unwrap_or(rest.len())].to_string()
    };
    let d = DEFAULTS;
    let expected: Vec<(&str, String)> = vec![
        ("method", d.method.into()),
        ("rank", format!("{}; VeRA {}", d.rank, d.vera_rank)),
        ("alpha", format!("{},", d.alpha)),
        ("dropout", d.dropout.to_string()),
        ("lr", d.lr.to_string()),
        ("max-grad-norm", d.max_grad_norm.to_string()),
        ("schedule", d.schedule.into()),
        ("warmup-steps", d.warmup_steps.to_string()),
        ("lr-ratio", d.lr_ratio.to_string()),
        ("delta-lambda", d.delta_lambda.to_string()),
        ("delta-warmup", d.delta_warmup.to_string()),
        ("batch", d.batch.to_string()),
        ("grad-accum", d.grad_accum.to_string()),
        ("seq", d.seq.to_string()),
        ("val-fraction", d.val_fraction.to_string()),
        ("val-rows", d.val_rows.to_string()),
        ("eval-every", d.eval_every.to_string()),
        ("save-every", d.save_every.to_string()),
        ("sample-tokens", d.sample_tokens.to_string()),
        ("seed", d.seed.to_string()),
        ("train-on", d.train_on.into()),
    ];
    for (flag, value) in expected {
        let b = block(flag);
        assert!(b.contains(&format!("[default: {value}")), "--{flag}: expected [default: {value}…] in {b:?}");
    }
}

#[test]
fn defaults_for_a_model_keep_rows_within_its_context() {
    let mut c = portalora::model::ModelConfig::simple(portalora::model::Arch::Gpt2, 8, 4, 1, 2, 2, 16, 40);
    c.max_positions = 40;
    assert_eq!(RunDefaults::for_model(&c), RunDefaults { seq: 40, ..DEFAULTS });
    c.max_positions = 8192;
    assert_eq!(RunDefaults::for_model(&c), DEFAULTS);
}

#[test]
fn each_epoch_reads_every_training_row_once_in_a_fresh_order() {
    let plan = Plan { batch: 3, grad_accum: 2, steps: Some(10), seed: 7, ..Plan::default() };
    let mut run = RunState::new(data(12, 2), &plan).unwrap();
    let read: Vec<u32> = walk(&mut run, 10).concat();
    assert_eq!(read.len(), 60);
    let epochs: Vec<&[u32]> = read.chunks(12).collect();
    for (e, ep) in epochs.iter().enumerate() {
        let set: BTreeSet<u32> = ep.iter().copied().collect();
        assert_eq!(set, (0..12).collect(), "epoch {e} reads every row once: {ep:?}");
    }
    assert_ne!(epochs[0], epochs[1], "each epoch is shuffled afresh");
    assert_ne!(epochs[0], (0..12).collect::<Vec<u32>>().as_slice(), "shuffled");
    assert_eq!((run.step(), run.rows_read(), run.done()), (10, 60, true));

    // In order without shuffling.
    let mut run =
        RunState::new(data(5, 0), &Plan { batch: 2, steps: Some(4), shuffle: false, ..Plan::default() }).unwrap();
    assert_eq!(walk(&mut run, 4), [vec![0, 1], vec![2, 3], vec![4, 0], vec![1, 2]]);
}

#[test]
fn a_resumed_run_reads_what_the_uninterrupted_one_reads() {
    let plan = Plan { batch: 4, steps: Some(9), seed: 3, ..Plan::default() };
    let mut whole = RunState::new(data(10, 1), &plan).unwrap();
    let all = walk(&mut whole, 9);
    let mut first = RunState::new(data(10, 1), &plan).unwrap();
    let head = walk(&mut first, 4);
    let mut resumed = RunState::new(data(10, 1), &plan).unwrap();
    resumed.resume_at(first.step(), first.rows_read());
    let tail = walk(&mut resumed, 5);
    assert_eq!([head, tail].concat(), all);
    assert!(resumed.done());
}

#[test]
fn the_run_length_evaluations_and_batch_follow_the_plan() {
    // 2.5 epochs of 10 rows in steps of 2 × 2 rows: ceil(25 / 4) = 7 steps.
    let plan = Plan { batch: 2, grad_accum: 2, epochs: Some(2.5), eval_every: 3, ..Plan::default() };
    let run = RunState::new(data(10, 2), &plan).unwrap();
    assert_eq!((run.steps(), run.batch(), run.micro_batches()), (7, 2, 2));
    let due: Vec<u64> = (0..=7).filter(|&t| run.evaluates(t)).collect();
    assert_eq!(due, [0, 3, 6, 7]);
    assert!(run.notes().is_empty());
    // Fewer rows than a batch: the batch is what there is, and said so.
    let run = RunState::new(data(3, 1), &Plan { batch: 8, steps: Some(2), ..Plan::default() }).unwrap();
    assert_eq!(run.batch(), 3);
    assert!(run.notes()[0].contains("3 training row(s), fewer than the batch of 8"), "{:?}", run.notes());
    // At most val_rows validation rows.
    let run = RunState::new(data(4, 5), &Plan { steps: Some(1), val_rows: 2, ..Plan::default() }).unwrap();
    assert_eq!(run.val().unwrap().ids.len(), 2);
    // Fixed rows (--ids): every step trains on all of them, in order, in grad_accum micro-batches.
    let fixed = RunData { fixed: true, ..data(6, 0) };
    let mut run = RunState::new(fixed, &Plan { batch: 1, grad_accum: 3, steps: Some(2), ..Plan::default() }).unwrap();
    let step: Vec<Vec<u32>> = run.next_step().iter().map(|m| m.ids.iter().map(|r| r[0]).collect()).collect();
    assert_eq!(step, [vec![0, 1], vec![2, 3], vec![4, 5]]);
    assert!(run.val().is_none());
}

#[test]
fn plans_that_contradict_themselves_or_the_data_are_refused() {
    let err = |d: RunData, p: Plan| RunState::new(d, &p).err().map(|e| e.to_string()).unwrap_or_default();
    let p = Plan { steps: Some(2), ..Plan::default() };
    assert!(err(data(4, 1), Plan { batch: 0, ..p.clone() }).contains("--batch 0"));
    assert!(err(data(4, 1), Plan { steps: None, ..p.clone() }).contains("give --steps N or --epochs E"));
    assert!(err(data(4, 1), Plan { epochs: Some(1.0), ..p.clone() }).contains("not both"));
    assert!(err(data(4, 1), Plan { steps: None, epochs: Some(-1.0), ..p.clone() }).contains("--epochs -1"));
    assert!(
        err(data(4, 0), Plan { eval_every: 2, ..p.clone() }).contains("--eval-every 2: there are no validation rows")
    );
    assert!(err(RunData { fixed: true, ..data(5, 0) }, Plan { grad_accum: 2, ..p.clone() }).contains("5 rows"));
    assert!(err(data(0, 0), p).contains("no training rows"));
    // A setting the method does not use, by its name on either side.
    let unused = unused_by_method(Method::Vera, &["alpha", "lr_ratio", "rank"]);
    let names: Vec<&str> = unused.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["alpha", "lr_ratio"]);
    assert!(unused_by_method(Method::LoraPlus, &["lr_ratio", "alpha"]).is_empty());
    // DoRA takes a ratio as LoRA+'s groups; LoRA does not.
    assert!(unused_by_method(Method::Dora, &["lr_ratio", "alpha"]).is_empty());
    assert_eq!(unused_by_method(Method::Lora, &["lr_ratio"]).len(), 1);
}

/// An ids file is `input_ids` alone, or with an all-ones `attention_mask` (a tokenizer's output
/// without padding); a mask with zeros, or `labels`, would change what is trained: refused.
#[test]
fn an_ids_file_reads_input_ids_and_a_mask_of_ones_only() {
    let dir = std::env::temp_dir().join(format!("portalora-ids-mask-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let read = |text: &str| {
        let p = dir.join("ids.json");
        std::fs::write(&p, text).unwrap();
        portalora::finetune::read_ids(&p).map_err(|e| e.to_string())
    };
    let ids = vec![vec![5u32, 6, 7], vec![8, 9, 10]];
    assert_eq!(read(r#"{"input_ids": [[5, 6, 7], [8, 9, 10]]}"#).unwrap(), ids);
    let masked = r#"{"input_ids": [[5, 6, 7], [8, 9, 10]], "attention_mask": [[1, 1, 1], [1, 1, 1]]}"#;
    assert_eq!(read(masked).unwrap(), ids);
    let padded = read(r#"{"input_ids": [[5, 6, 7], [8, 9, 0]], "attention_mask": [[1, 1, 1], [1, 1, 0]]}"#);
    assert!(padded.unwrap_err().contains("attention_mask with zeros"));
    let labels = read(r#"{"input_ids": [[5, 6, 7]], "labels": [[-100, 6, 7]]}"#);
    assert!(labels.unwrap_err().contains("has \"labels\", which portalora does not read"));
    std::fs::remove_dir_all(&dir).unwrap();
}
