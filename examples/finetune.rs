//! Fine-tune a LoRA adapter from an app: the library calls `portalora train` is built on.
//!
//! ```text
//! cargo run --release --example finetune -- MODEL TEXT OUT [STEPS]
//! ```
//! MODEL is a .gguf file or a Hugging Face folder, TEXT a UTF-8 text file (or a folder of them,
//! or JSONL), OUT the folder that receives the PEFT adapter, the log and the loss curve.
//! Copy this file into your app and adapt the configuration.

use portalora::adapter::{AdapterConfig, Method};
use portalora::finetune::{run, Event, RunConfig};
use portalora::train::{Schedule, TrainConfig};

const USAGE: &str = "usage: finetune MODEL TEXT OUT [STEPS]
  MODEL  a .gguf file or a Hugging Face folder
  TEXT   a UTF-8 text file, a folder of them, or JSONL
  OUT    a new folder for the PEFT adapter, the log and the loss curve
  STEPS  optimizer steps (default 30)";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    // Errors in words (a `main` returning `Result` would print them debug-quoted).
    match finetune(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn finetune(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [_, model, text, out, rest @ ..] = args else {
        return Err(USAGE.into());
    };
    let steps: u64 = match rest {
        [] => 30,
        [s] => s.parse().map_err(|_| format!("STEPS {s:?} is not a whole number\n{USAGE}"))?,
        _ => return Err(format!("too many arguments\n{USAGE}").into()),
    };

    // The engine: one GPU device (Vulkan, Metal or DX12; Mesa's lavapipe on a machine without GPU).
    let ctx = pollster::block_on(portalora::gpu::Context::new())?;
    println!("GPU: {} ({})", ctx.info().name, ctx.info().backend);

    // What to train: LoRA r = 8 on the attention projections of a LLaMA-family model.
    let mut cfg = RunConfig::new(model, out);
    cfg.data = Some(text.into());
    cfg.adapter = AdapterConfig {
        rank: 8,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into(), "o_proj".into()],
        ..AdapterConfig::new(Method::Lora)
    };
    cfg.train = TrainConfig {
        lr: 1e-3,
        schedule: Schedule::Cosine,
        warmup_steps: 2, // the schedule's length is the run's (cfg.steps)
        ..TrainConfig::default()
    };
    cfg.batch = 2;
    // Rows of 128 tokens, or the model's whole context where it is shorter.
    cfg.seq = portalora::run::RunDefaults::for_model(&portalora::model::read_config(model)?).seq;
    cfg.steps = Some(steps);
    cfg.val_rows = 4;
    cfg.eval_every = 10;
    cfg.prompts = vec!["ROMEO:".into()];

    // The step callback sees every event: show progress however the app likes.
    let summary = run(&ctx, &cfg, false, &mut |e: &Event| match e {
        Event::Data(d) => println!("data: {d}"),
        Event::Step { stats, steps, tokens_per_s, .. } => {
            println!("step {}/{steps} loss {:.4} ({tokens_per_s:.0} tokens/s)", stats.step, stats.loss)
        }
        Event::Eval { step, val_loss } => println!("step {step}: validation loss {val_loss:.4}"),
        Event::Samples { after, samples } => {
            for (prompt, text) in samples.iter() {
                println!("{} {prompt}{text}", if *after { "after: " } else { "before:" });
            }
        }
        _ => {}
    })?;
    println!(
        "validation loss {:?} → {:?}; adapter (PEFT format) in {}, loss curve {}",
        summary.val_before,
        summary.val_after,
        summary.adapter_dir.display(),
        summary.plot.display()
    );

    // Load the adapter back for inference: evaluate or generate with it merged.
    let weights = portalora::model::load_model(model)?;
    let mut m = portalora::train::model_with_adapter(&ctx, &weights, 1, 2, &summary.adapter_dir)?;
    m.merge(&ctx)?;
    println!("adapter reloaded and merged into {} for inference", model);
    Ok(())
}
