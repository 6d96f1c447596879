//! What a new user's first hour hit (issue 29), each checked as they met it: the library's
//! schedule follows the run's length, a stop takes effect after the step it was asked for in, a
//! run that fails before its first checkpoint leaves nothing that blocks a rerun, output to a
//! closed pipe ends a command quietly, data a user did not mean (a byte-order mark, CRLF, JSON in
//! a text file, turns that do not alternate, hidden files) is read as meant or said, and inputs
//! are checked before a run is announced.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{bin, context, fixture, tmp};
use portalora::adapter::{AdapterConfig, Method};
use portalora::data::{self, formats::Document};
use portalora::finetune::{checkpoint_step, run, run_with, Event, RunConfig, RunOptions};
use portalora::io::tokenizer::Tokenizer;
use portalora::train::{OptimizerKind, Schedule, TrainConfig};

const VERSE: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";

fn tiny_run(out: &Path, text: &Path) -> RunConfig {
    let mut cfg = RunConfig::new(fixture("tiny_gpt2"), out);
    cfg.data = Some(text.to_path_buf());
    cfg.adapter = AdapterConfig { rank: 2, targets: vec!["c_attn".into()], ..AdapterConfig::new(Method::Lora) };
    (cfg.batch, cfg.seq, cfg.val_fraction) = (2, 16, 0.0);
    cfg
}

/// transformers' `get_{linear,cosine}_schedule_with_warmup` multiplier at step index `i`, in f64.
fn hf_multiplier(schedule: Schedule, i: u64, warmup: u64, total: u64) -> f64 {
    if i < warmup {
        return i as f64 / warmup as f64;
    }
    let progress = (i - warmup) as f64 / (total - warmup) as f64;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total - i) as f64 / (total - warmup) as f64).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// The README's library pattern (`RunConfig::new`, `steps` or `epochs`, a schedule) trains at
/// the schedule's rates over the run's length, without `total_steps`; one that disagrees is
/// refused; a Trainer alone asks for it.
#[test]
fn the_library_schedule_follows_the_run_length() {
    let Some(ctx) = context() else { return };
    let dir = tmp("first-hour-schedule");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(6)).unwrap();
    for (k, (schedule, steps, epochs)) in
        [(Schedule::Cosine, Some(7), None), (Schedule::Linear, None, Some(1.5))].into_iter().enumerate()
    {
        let mut cfg = tiny_run(&dir.join(format!("out{k}")), &text);
        cfg.train = TrainConfig { lr: 3e-3, schedule, warmup_steps: 2, ..TrainConfig::default() };
        (cfg.steps, cfg.epochs) = (steps, epochs);
        let mut lrs = Vec::new();
        let s = run(&ctx, &cfg, false, &mut |e| {
            if let Event::Step { stats, .. } = e {
                lrs.push((stats.step, stats.lr));
            }
        })
        .unwrap();
        let total = s.steps;
        assert!(total >= 4, "{schedule:?}: {total} steps");
        assert_eq!(lrs.len() as u64, total);
        for (t, lr) in lrs {
            let want = 3e-3 * hf_multiplier(schedule, t - 1, 2, total);
            assert!((lr - want).abs() <= 1e-12, "{schedule:?} step {t}/{total}: lr {lr}, transformers {want}");
        }
    }
    // An app's total_steps that is not the run's length is refused, before anything is written.
    let out = dir.join("disagrees");
    let mut cfg = tiny_run(&out, &text);
    cfg.train = TrainConfig { schedule: Schedule::Cosine, total_steps: Some(100), ..TrainConfig::default() };
    cfg.steps = Some(5);
    let e = run(&ctx, &cfg, false, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("total_steps 100 disagrees with the run's 5 steps"), "{e}");
    assert!(!out.exists(), "a refused run leaves no folder");
    // A Trainer used alone has no run to take the length from.
    let w = portalora::model::load_model(fixture("tiny_gpt2")).unwrap();
    let tc = TrainConfig { schedule: Schedule::Cosine, ..TrainConfig::default() };
    let e = portalora::train::Trainer::new(&ctx, &w, 1, 8, &cfg.adapter, &tc, None).err().unwrap().to_string();
    assert!(e.contains("cosine schedule") && e.contains("total_steps"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// RunOptions::stop set while step 2 is reported ends the run after step 2 (it used to train
/// step 3 first), with its checkpoint.
#[test]
fn a_stop_asked_for_during_a_step_ends_the_run_after_it() {
    let Some(ctx) = context() else { return };
    let dir = tmp("first-hour-stop");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(6)).unwrap();
    let out = dir.join("out");
    let mut cfg = tiny_run(&out, &text);
    cfg.steps = Some(10);
    let stop = AtomicBool::new(false);
    let opts = RunOptions { stop: Some(&stop), ..RunOptions::default() };
    let s = run_with(&ctx, &cfg, opts, &mut |e| {
        if let Event::Step { stats, .. } = e {
            if stats.step == 2 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert!(s.interrupted);
    assert_eq!((s.steps, s.trained_steps, s.train_loss.len()), (2, 2, 2));
    assert_eq!(checkpoint_step(&out), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run that fails before its first checkpoint (here its loss overflows at step 2) clears what
/// it wrote, so the same command runs again; in a folder that was there (empty) before, the
/// folder stays, empty. A refused run leaves a given folder as it was.
#[test]
fn a_run_that_fails_before_its_first_checkpoint_leaves_nothing_in_the_way() {
    let Some(ctx) = context() else { return };
    let dir = tmp("first-hour-fail");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(6)).unwrap();
    for existed in [false, true] {
        let out = dir.join(format!("out-{existed}"));
        if existed {
            std::fs::create_dir_all(&out).unwrap();
        }
        let mut cfg = tiny_run(&out, &text);
        cfg.steps = Some(8);
        cfg.train = TrainConfig { optimizer: OptimizerKind::Sgd, lr: 1e30, ..TrainConfig::default() };
        let mut notes = Vec::new();
        let e = run(&ctx, &cfg, false, &mut |e| {
            if let Event::Note(n) = e {
                notes.push(n.to_string());
            }
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not finite"), "{e}");
        assert!(notes.iter().any(|n| n.contains("before its first checkpoint")), "{notes:?}");
        match existed {
            false => assert!(!out.exists(), "the folder the run made is gone"),
            true => assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "the folder that was there is empty"),
        }
        cfg.train.lr = 1e-3;
        let s = run(&ctx, &cfg, false, &mut |_| {}).unwrap();
        assert_eq!(s.steps, 8);
        assert!(!out.join(portalora::outdir::LOCK_FILE).exists(), "a finished run leaves no lock file");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `train … | head -2` ends quietly (no panic, status 141) with the run resumable, and so does
/// `tokenize … | head -1`; a closed stderr panics nothing either.
#[test]
fn output_to_a_closed_pipe_ends_the_command_quietly() {
    if context().is_none() {
        return;
    }
    let dir = tmp("first-hour-pipe");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(30)).unwrap();
    let out = dir.join("out");
    let gpt2 = fixture("tiny_gpt2");
    let mut child = bin()
        .args(["train", "--model", gpt2.to_str().unwrap(), "--targets", "c_attn", "--data", text.to_str().unwrap()])
        .args(["--batch", "2", "--seq", "16", "--steps", "400", "--save-every", "0", "--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let head: Vec<String> = lines.by_ref().take(2).map(Result::unwrap).collect();
    drop(lines);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(141), "{head:?}\n{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    let at = checkpoint_step(&out).expect("a checkpoint to resume from");
    assert!(at < 400, "stopped at step {at}");
    let st = bin().args(["train", "--resume", out.to_str().unwrap()]).stdout(Stdio::null()).status().unwrap();
    assert!(st.success());
    assert_eq!(checkpoint_step(&out), Some(400));

    // More than a pipe holds (64 KiB), so that tokenize is still writing when the pipe closes.
    let long = dir.join("long.txt");
    std::fs::write(&long, VERSE.repeat(4000)).unwrap();
    let mut child = bin()
        .args(["tokenize", "--model", gpt2.to_str().unwrap(), "--data", long.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stderr).trim()), (Some(141), ""), "{first}");

    // stderr a closed pipe: the error has nowhere to go, and nothing panics (status 101).
    let mut child = bin()
        .args(["tokenize", "--model", "nothere.gguf", "--data", "nothere.txt"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(1));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A byte-order mark is dropped and CRLF read as LF (each said once per run), a text file of
/// JSON lines and conversations whose turns do not alternate are warned of by file and line,
/// hidden files under a folder are skipped and counted, and a document's first token is never
/// a target, in `tokenize --json` as in training.
#[test]
fn data_a_user_did_not_mean_is_read_as_meant_or_said() {
    let tok = Tokenizer::for_model(&fixture("tiny_gpt2")).unwrap();
    let dir = tmp("first-hour-data");
    let plain = dir.join("plain.txt");
    std::fs::write(&plain, "To be,\nor not.\n").unwrap();
    let marked = dir.join("marked");
    std::fs::create_dir_all(&marked).unwrap();
    std::fs::write(marked.join("bom.txt"), "\u{feff}To be,\nor not.\n").unwrap();
    std::fs::write(marked.join("crlf.txt"), "To be,\r\nor not.\r\n").unwrap();
    std::fs::write(marked.join(".notes.txt"), "an editor's file").unwrap();
    let ids = |p: &Path| data::tokenized_documents(p, &tok, &data::ChatOptions::default()).unwrap().0.remove(0).ids;
    let want = ids(&plain);
    assert_eq!(ids(&marked.join("bom.txt")), want, "the BOM is not trained on");
    assert_eq!(ids(&marked.join("crlf.txt")), want, "no \\r tokens");
    let ds = data::load(&marked, &tok, 4, 0.0, 0).unwrap();
    let notes = ds.summary.notes.join("\n");
    assert!(notes.contains("bom.txt: a UTF-8 byte-order mark at the start was dropped"), "{notes}");
    assert!(notes.contains("crlf.txt: CRLF line ends were read as LF"), "{notes}");
    assert!(notes.contains("1 hidden file(s) or folder(s)"), "{notes}");
    assert_eq!(ds.summary.files, 2);
    // JSONL with a BOM parses (it failed with "not JSON … line 1 column 1").
    let jsonl = dir.join("bom.jsonl");
    std::fs::write(&jsonl, "\u{feff}{\"text\": \"To be\"}\n{\"text\": \"or not\"}\n").unwrap();
    let d = data::documents(&jsonl).unwrap();
    assert!(d.bom && d.docs.len() == 2);
    // A .txt of JSON lines: trained as text, as asked, and warned of.
    let json_txt = dir.join("lines.txt");
    std::fs::write(&json_txt, "\n{\"text\": \"To be\"}\n{\"text\": \"or not\"}\n").unwrap();
    let w = data::documents(&json_txt).unwrap().warnings.join("\n");
    assert!(w.contains("lines.txt:2: this line is a JSON object") && w.contains(".jsonl"), "{w}");
    // Turns that do not alternate: one warning for the file, the first line and the others'.
    let chat = dir.join("chat.jsonl");
    let turn = |r: &str| format!("{{\"role\": \"{r}\", \"content\": \"hi\"}}");
    let line = |roles: &[&str]| {
        format!("{{\"messages\": [{}]}}", roles.iter().map(|r| turn(r)).collect::<Vec<_>>().join(", "))
    };
    let lines = [
        line(&["system", "user", "assistant"]),
        line(&["user", "user", "assistant"]),
        line(&["user", "assistant", "system", "user", "assistant"]),
        line(&["user", "assistant", "assistant"]),
    ];
    std::fs::write(&chat, lines.join("\n")).unwrap();
    let d = data::documents(&chat).unwrap();
    assert!(matches!(d.docs[0].1, Document::Chat(_)));
    let w = d.warnings.join("\n");
    assert!(w.contains("chat.jsonl:2: the turns do not alternate (turns 1 and 2 are both user)"), "{w}");
    assert!(w.contains("2 more conversation(s) likewise (line 3, 4)"), "{w}");
    assert_eq!(d.warnings.len(), 1);
    // The first token of a document is not a target, in what tokenize shows and what trains.
    let docs = data::tokenized_documents(&plain, &tok, &data::ChatOptions::default()).unwrap().0;
    assert!(!docs[0].predict[0] && docs[0].predict[1..].iter().all(|&p| p));
    let o = bin()
        .args(["tokenize", "--model", fixture("tiny_gpt2").to_str().unwrap(), "--json", "--data"])
        .arg(&plain)
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(v["targets"][0], 0);
    assert_eq!(v["ids"].as_array().unwrap().len(), want.len());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bad target or a missing input is refused before the run is announced (nothing on stdout),
/// naming the flag; `eval` says its data summary in its own terms.
#[test]
fn inputs_are_checked_before_the_run_is_announced() {
    if context().is_none() {
        return;
    }
    let dir = tmp("first-hour-inputs");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(4)).unwrap();
    let gpt2 = fixture("tiny_gpt2");
    let train = |extra: &[&str]| {
        bin()
            .args(["train", "--model", gpt2.to_str().unwrap(), "--steps", "1", "--batch", "1", "--seq", "8"])
            .args(["--out", dir.join("out").to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, want) in [
        (vec!["--targets", "c_atn", "--data", text.to_str().unwrap()], "valid targets: c_attn"),
        (vec!["--targets", "c_attn", "--data", "nothere.txt"], "--data nothere.txt: no such file or folder"),
        (
            vec!["--targets", "c_attn", "--data", text.to_str().unwrap(), "--init-adapter", "nothere"],
            "--init-adapter nothere: no such file or folder",
        ),
    ] {
        let o = train(&extra);
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(!o.status.success() && stderr.contains(want), "{extra:?}: {stderr}");
        assert!(stdout.is_empty(), "{extra:?}: announced before refusing: {stdout}");
        assert!(!dir.join("out").exists());
    }
    // A folder this process cannot write in (where there is one: /sys refuses even root).
    if std::fs::write("/sys/portalora-probe", b"").is_err() && Path::new("/sys").is_dir() {
        let o = train(&["--targets", "c_attn", "--data", text.to_str().unwrap(), "--out", "/sys/portalora-out"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("/sys/portalora-out: cannot write in /sys (") && o.stdout.is_empty(), "{stderr}");
    }
    let o =
        bin().args(["eval", "--model", gpt2.to_str().unwrap(), "--seq", "16", "--data"]).arg(&text).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains(" rows of 16") && !stderr.contains("validation"), "{stderr}");
    assert!(stderr.contains("1 file, 1 document,"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The embedding example says how to call it, in words, and exits 0 for --help.
#[test]
fn the_example_app_explains_itself() {
    let exe = std::env::current_exe().unwrap();
    let example = exe.parent().and_then(Path::parent).map(|d| d.join("examples/finetune"));
    let Some(example) = example.filter(|p| p.exists()) else {
        eprintln!("SKIPPED: the finetune example is not built (cargo test builds it)");
        return;
    };
    let o = std::process::Command::new(&example).arg("--help").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("usage: finetune MODEL TEXT OUT [STEPS]"));
    let o = std::process::Command::new(&example).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.starts_with("error: usage: finetune") && !stderr.contains('"'), "{stderr}");
}
