//! Runs people can trust, driven through the command line as a user drives them: Ctrl-C ends a
//! run after its step with a checkpoint and the adapter so far (a second Ctrl-C at once), a
//! resumed run only moves forward, an output folder is never clobbered and never shared by two
//! processes, `eval --data` reads data as `train --data` does, and `generate` says why it stopped.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, context, fixture, tmp};
use portalora::finetune::checkpoint_step;

const VERSE: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";

/// `portalora train` on the tiny GPT-2 with dropout (so the seed matters), plus `extra`.
fn train_args(text: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
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
        "--seed",
        "5",
        "--steps",
        &steps.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn output(args: &[String], out: &Path) -> Output {
    bin().args(args).arg("--out").arg(out).output().unwrap()
}

fn log_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn step_losses(out: &Path) -> Vec<(u64, f64)> {
    log_lines(out).iter().filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?))).collect()
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

/// Waits until `out`'s log holds `n` step lines, with the child still running.
fn wait_for_steps(child: &mut Child, out: &Path, n: usize) {
    let t0 = Instant::now();
    while step_losses(out).len() < n {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGINT, as Ctrl-C in the run's terminal sends it.
fn interrupt(child: &Child) {
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
}

#[test]
fn ctrl_c_ends_the_step_with_a_checkpoint_and_the_run_resumes_exactly() {
    if context().is_none() {
        return;
    }
    let dir = tmp("ctrl-c");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(30)).unwrap();
    let args = train_args(&text, 40, &[]);
    let (a, b) = (dir.join("a"), dir.join("b"));
    assert!(output(&args, &a).status.success());
    let mut child =
        bin().args(&args).arg("--out").arg(&b).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_steps(&mut child, &b, 6);
    interrupt(&child);
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(130), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains(&format!("portalora train --resume {}", b.display())), "{stdout}");
    // The checkpoint, the adapter and the log all stand at the step the run stopped after.
    let at = checkpoint_step(&b).expect("a checkpoint");
    assert!((6..40).contains(&at), "stopped at step {at}");
    assert_eq!(step_losses(&b).last().unwrap().0, at);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("summary.json")).unwrap()).unwrap();
    assert_eq!((summary["steps"].as_u64(), summary["interrupted"].as_bool()), (Some(at), Some(true)));
    assert!(!adapter(&b).is_empty());
    let st = bin().arg("train").arg("--resume").arg(&b).stdout(Stdio::null()).status().unwrap();
    assert!(st.success());
    assert_eq!(step_losses(&a), step_losses(&b), "the resumed run's losses differ from the uninterrupted run's");
    assert!(adapter(&a) == adapter(&b), "the resumed run's adapter differs from the uninterrupted run's");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_ctrl_c_stops_at_once_and_leaves_the_last_checkpoint() {
    if context().is_none() {
        return;
    }
    let dir = tmp("ctrl-c-twice");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(30)).unwrap();
    let out = dir.join("out");
    let args = train_args(&text, 100_000, &["--save-every", "2"]);
    let mut child =
        bin().args(&args).arg("--out").arg(&out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_steps(&mut child, &out, 5);
    interrupt(&child);
    interrupt(&child);
    let t0 = Instant::now();
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.code(), Some(130), "ended by signal {:?}", st.signal());
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?} to stop", t0.elapsed());
    // Whatever was being written, the checkpoint on disk is a whole one.
    let at = checkpoint_step(&out).expect("a checkpoint");
    let ck =
        if out.join("checkpoint/state.json").exists() { out.join("checkpoint") } else { out.join("checkpoint.old") };
    portalora::adapter::peft::PeftFile::read(&ck).unwrap();
    assert!(at >= 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resumed_run_only_moves_forward_and_extends_exactly() {
    if context().is_none() {
        return;
    }
    let dir = tmp("forward");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(30)).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    assert!(output(&train_args(&text, 10, &[]), &a).status.success());
    // 6 steps with a checkpoint every 4: the last step writes one too.
    assert!(output(&train_args(&text, 6, &["--save-every", "4", "--eval-every", "3"]), &b).status.success());
    assert_eq!(checkpoint_step(&b), Some(6));
    let resume = |extra: &[&str]| bin().arg("train").arg("--resume").arg(&b).args(extra).output().unwrap();
    let o = resume(&["--steps", "10"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--steps 10 (was 6"));
    // Extended to 10 steps (a constant schedule), the run equals one that was 10 steps long.
    assert_eq!(step_losses(&a), step_losses(&b));
    assert!(adapter(&a) == adapter(&b));
    // Every resumed log line keeps every field, and run.json records the new target.
    for v in log_lines(&b).iter().filter(|v| v.get("loss").is_some()) {
        for k in ["lr", "tokens", "seconds", "grad_norm"] {
            assert!(v.get(k).is_some(), "log line without {k}: {v}");
        }
    }
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(b.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["steps"], 10);
    // A plain --resume of a finished run does nothing; a target behind it is refused.
    let (before, log_before) = (adapter(&b), std::fs::read(b.join("log.jsonl")).unwrap());
    let o = resume(&[]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("already at step 10 of 10"));
    let o = resume(&["--steps", "8"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--steps 8 is behind the checkpoint of step 10"));
    assert!(adapter(&b) == before && std::fs::read(b.join("log.jsonl")).unwrap() == log_before, "files changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_output_folder_is_never_clobbered_nor_shared() {
    if context().is_none() {
        return;
    }
    let dir = tmp("clobber");
    let text = dir.join("verse.txt");
    std::fs::write(&text, VERSE.repeat(30)).unwrap();
    let a = dir.join("a");
    assert!(output(&train_args(&text, 4, &[]), &a).status.success());
    let first = adapter(&a);
    let o = output(&train_args(&text, 2, &["--seed", "9"]), &a);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is not empty"));
    assert!(adapter(&a) == first, "a refused run changed the adapter");
    // --overwrite replaces the folder whole: no checkpoint or log of the old run survives.
    assert!(output(&train_args(&text, 2, &["--seed", "9", "--overwrite"]), &a).status.success());
    assert_eq!(checkpoint_step(&a), Some(2));
    assert_eq!(step_losses(&a).len(), 2);
    // A folder in use by a running process is refused to a second one, and free again once the
    // first is killed (the lock dies with the process).
    let b = dir.join("b");
    let args = train_args(&text, 100_000, &["--save-every", "2"]);
    let mut child = bin().args(&args).arg("--out").arg(&b).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_steps(&mut child, &b, 3);
    let o = bin().arg("train").arg("--resume").arg(&b).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("in use by another portalora process"), "{stderr}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at = checkpoint_step(&b).expect("a checkpoint");
    let o = bin().arg("train").arg("--resume").arg(&b).args(["--steps", &(at + 1).to_string()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // merge: a folder that holds something needs --overwrite, and is then replaced whole.
    let merged = dir.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    std::fs::write(merged.join("mine.txt"), "keep").unwrap();
    let m = |extra: &[&str]| {
        bin()
            .args(["merge", "--model", fixture("tiny_gpt2").to_str().unwrap(), "--adapter"])
            .arg(&a)
            .arg("--out")
            .arg(&merged)
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(!m(&[]).status.success() && merged.join("mine.txt").exists());
    assert!(m(&["--overwrite"]).status.success());
    assert!(!merged.join("mine.txt").exists() && merged.join("model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `eval --json`'s loss and token count.
fn eval(args: &[&str]) -> (f64, u64) {
    let o = bin().arg("eval").args(args).arg("--json").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
}

#[test]
fn eval_reads_data_as_train_does() {
    if context().is_none() {
        return;
    }
    let dir = tmp("eval-data");
    let model = fixture("tiny_gpt2");
    let tok = portalora::io::tokenizer::Tokenizer::for_model(&model).unwrap();
    let m = model.to_str().unwrap();
    // Prompt/completion JSONL: only the completions (and their end-of-text tokens) are scored.
    let jsonl = dir.join("pc.jsonl");
    let pairs =
        [("To be, or not", " to be, that is"), ("Whether 'tis", " nobler in the mind"), ("to suffer", " the slings")];
    let lines: Vec<String> =
        pairs.iter().map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string()).collect();
    std::fs::write(&jsonl, (lines.join("\n") + "\n").repeat(4)).unwrap();
    let ds = portalora::data::load(&jsonl, &tok, 16, 0.0, 0).unwrap();
    let targets: usize = ds.train.iter().map(|r| r.predict[1..].iter().filter(|&&p| p).count()).sum();
    let (masked, n) = eval(&["--model", m, "--data", jsonl.to_str().unwrap(), "--seq", "16"]);
    assert_eq!(n as usize, targets, "scored positions");
    // The same rows as ids, unmasked: every position scored, a different mean.
    let ids = dir.join("ids.json");
    let rows: Vec<Vec<u32>> = ds.train.iter().map(|r| r.ids.clone()).collect();
    std::fs::write(&ids, serde_json::json!({ "input_ids": rows }).to_string()).unwrap();
    let (all, n_all) = eval(&["--model", m, "--ids", ids.to_str().unwrap()]);
    assert_eq!(n_all as usize, rows.len() * 15);
    assert!((masked - all).abs() > 1e-3, "masked {masked} vs all {all}");
    // A folder of texts reads as train reads it: its documents packed in file order.
    let texts = dir.join("texts");
    std::fs::create_dir_all(&texts).unwrap();
    std::fs::write(texts.join("a.txt"), VERSE.repeat(3)).unwrap();
    std::fs::write(texts.join("b.txt"), VERSE.repeat(2)).unwrap();
    let ds = portalora::data::load(&texts, &tok, 16, 0.0, 0).unwrap();
    let rows: Vec<Vec<u32>> = ds.train.iter().map(|r| r.ids.clone()).collect();
    std::fs::write(&ids, serde_json::json!({ "input_ids": rows }).to_string()).unwrap();
    let from_folder = eval(&["--model", m, "--data", texts.to_str().unwrap(), "--seq", "16"]);
    assert_eq!(from_folder, eval(&["--model", m, "--ids", ids.to_str().unwrap()]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_says_when_the_context_is_full() {
    if context().is_none() {
        return;
    }
    // The tiny GPT-2 has 40 positions: a 30-character prompt leaves room for about 10 tokens.
    let o = bin()
        .args([
            "generate",
            "--model",
            fixture("tiny_gpt2").to_str().unwrap(),
            "--prompt",
            "To be, or not to be, that is t",
        ])
        .args(["--max-tokens", "50"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("context of 40 positions is full"), "{stderr}");
}
