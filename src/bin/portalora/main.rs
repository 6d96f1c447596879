//! The portalora command line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use portalora::gpu::{Context, CoopMode};

#[macro_use]
mod output;

mod export;
mod infer;
mod merge;
mod progress;
mod show;
mod stop;
mod tokenize;
mod train;

/// The flags given on the command line (or in a --config file), by argument id (`warmup_steps`):
/// what a command checks against the flags it would ignore.
pub(crate) type Given = BTreeSet<String>;

/// The command-line spelling of an argument id.
pub(crate) fn flag(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

#[derive(Parser)]
#[command(
    name = "portalora",
    version,
    about = "Fine-tune language models with LoRA-family adapters on any GPU through WebGPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the GPU adapter, backend, features and the limits that matter.
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load a model (a .gguf file or a Hugging Face folder) and describe it.
    Inspect {
        /// A .gguf file or a folder with config.json and model.safetensors.
        #[arg(long)]
        model: PathBuf,
    },
    /// Mean next-token cross-entropy of a model on token ids or text, computed on the GPU.
    /// With --json the last line is {"loss": <float>, "tokens": <int>}.
    Eval {
        /// A .gguf file or a Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// A JSON file {"input_ids": [[...], ...]} with rows of equal length.
        #[arg(long, conflicts_with = "data", required_unless_present = "data")]
        ids: Option<PathBuf>,
        /// Text, a folder of texts, or JSONL, read as `train --data` reads it (documents packed into
        /// rows of --seq tokens; prompt/completion data scores the completions only, conversations
        /// the assistant's turns unless --train-on all).
        #[arg(long)]
        data: Option<PathBuf>,
        /// A chat template (Jinja) for conversations in --data, replacing the model's.
        #[arg(long)]
        chat_template: Option<PathBuf>,
        /// Which tokens of a conversation are scored: assistant or all [default: assistant].
        #[arg(long, value_parser = |s: &str| s.parse::<portalora::data::TrainOn>())]
        train_on: Option<portalora::data::TrainOn>,
        /// One document per row, padded (padding is never scored), instead of packing.
        #[arg(long)]
        no_packing: bool,
        /// Tokens per row with --data (the tail shorter than a row is dropped).
        #[arg(long, default_value_t = portalora::run::DEFAULTS.seq)]
        seq: usize,
        /// Rows per forward pass (memory grows with batch × seq).
        #[arg(long, default_value_t = portalora::run::DEFAULTS.batch)]
        batch: usize,
        /// A PEFT adapter folder (any method; written by portalora or by PEFT) or a GGUF LoRA file
        /// to evaluate with.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Print the result as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Show what training sees: each document of --data as token ids with the loss targets
    /// marked, before packing. With --json one line per document: {"ids": [...], "targets":
    /// [...]}, targets[i] = 1 where ids[i] is a loss target (predicted from the tokens before it).
    Tokenize(tokenize::TokenizeArgs),
    /// Write a fine-tune as GGUF for llama.cpp, Ollama and LM Studio: the adapter as a GGUF LoRA
    /// file (--as lora), or the base with the adapter merged (--as merged); --modelfile adds
    /// Ollama's Modelfile.
    Export(export::ExportArgs),
    /// Continue a prompt with the model, on the GPU with a KV cache.
    Generate {
        /// A .gguf file or a Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// Text to continue, as it stands.
        #[arg(long, required_unless_present = "chat", conflicts_with = "chat")]
        prompt: Option<String>,
        /// A user message: rendered with the model's chat template (or --chat-template) with the
        /// assistant's turn opened; generation stops at the template's end of turn.
        #[arg(long)]
        chat: Option<String>,
        /// A system message before --chat.
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// A chat template (Jinja) for --chat, replacing the model's.
        #[arg(long, requires = "chat")]
        chat_template: Option<PathBuf>,
        /// New tokens at most (generation also stops at the end-of-sequence token).
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 picks the most likely token every time (greedy); higher values sample more freely.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sample only among the k most likely tokens (0: no limit).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample only among the most likely tokens whose probabilities add up to p (1: no limit).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A PEFT adapter folder or a GGUF LoRA file, run beside the base (unmerged).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Print special tokens (end of turn, end of text) too.
        #[arg(long)]
        special: bool,
        /// Print one JSON line at the end instead: {"prompt_ids": [...], "ids": [...], "text": "..."}
        /// (the prompt's token ids, the new ones, and their text).
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune an adapter (LoRA, LoRA-FA, VeRA, Delta-LoRA, LoRA+ or DoRA) and write it in PEFT's
    /// format.
    #[command(args_override_self = true)]
    Train(Box<train::TrainArgs>),
    /// Merge an adapter into its base model and write a Hugging Face folder with the base's key
    /// names and layouts.
    Merge {
        /// The base model: a .gguf file or a Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter folder (any method) or a GGUF LoRA file.
        #[arg(long)]
        adapter: PathBuf,
        /// The output folder (config.json, model.safetensors, tokenizer files); written whole
        /// beside its name and renamed into place.
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it already holds something.
        #[arg(long)]
        overwrite: bool,
    },
    /// Measure speed.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// GFLOP/s of the f32 matmul kernels on a fixed list of shapes.
    Matmul {
        /// One JSON object per shape and line: {"m","k","n","op","path","gflops","min","max"}.
        #[arg(long)]
        json: bool,
        /// Kernel path: auto (subgroup where available), portable or subgroup.
        #[arg(long, value_enum, default_value_t = PathArg::Auto)]
        path: PathArg,
        /// Timed repeats per shape (median, min and max are reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Seconds each repeat should last (more copies of the kernel per submission).
        #[arg(long, default_value_t = 0.3)]
        seconds: f64,
        /// Only these shapes, as MxKxN with an optional nn/nt/tn/tt suffix (A and B transposed or
        /// not), e.g. 2048x768x768,768x2048x768tn
        #[arg(long, value_delimiter = ',')]
        shapes: Vec<String>,
    },
    /// Cooperative matrices (tensor cores, simdgroup matrices) through wgpu's experimental
    /// feature: the shapes the adapter offers, then the matmul's cooperative-matrix path on a
    /// SIZE × SIZE · (SIZE × SIZE)ᵀ product of random values (f16 operands, f32 accumulation),
    /// checked against an f64 product and timed beside the subgroup kernel on the same product.
    Coop {
        /// The product's size.
        #[arg(long, default_value_t = 2048)]
        size: usize,
    },
    /// Training-step speed and GPU memory: tokens/s (median over steps after warm-up), bytes
    /// allocated by kind, and a per-kernel GPU time breakdown from timestamp queries.
    Step(Box<BenchStepArgs>),
}

#[derive(clap::Args)]
pub(crate) struct BenchStepArgs {
    /// A GGUF file or a Hugging Face folder.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// lora, lora-fa, vera, delta-lora, lora-plus or dora.
    #[arg(long, default_value = "lora")]
    pub(crate) method: String,
    /// Adapter rank (VeRA: the shared matrices' rank).
    #[arg(long, default_value_t = 8)]
    pub(crate) rank: usize,
    #[arg(long, default_value_t = 4)]
    pub(crate) batch: usize,
    #[arg(long, default_value_t = 128)]
    pub(crate) seq: usize,
    /// Projections to adapt; default: every projection of the model.
    #[arg(long, value_delimiter = ',')]
    pub(crate) targets: Vec<String>,
    /// How the frozen base is stored on the GPU: f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k,
    /// q3_k, q4_k, q5_k, q6_k, or auto (as in the file: a GGUF's quantized tensors stay
    /// quantized).
    #[arg(long, default_value = "auto")]
    pub(crate) base_dtype: String,
    /// Recompute the MLP's gate/up projections in backward instead of keeping them.
    #[arg(long)]
    pub(crate) recompute_mlp: bool,
    /// Activations kept for the backward pass as f32 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    pub(crate) activations: String,
    /// Rows of logits computed at a time (a multiple of 64) [default: what fits 32 MiB, 256 MiB
    /// on a discrete GPU].
    #[arg(long)]
    pub(crate) logit_chunk_rows: Option<usize>,
    /// Timed steps after the warm-up.
    #[arg(long, default_value_t = 5)]
    pub(crate) steps: usize,
    /// Untimed steps first (pipeline compilation, first touches of memory).
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Skip the per-kernel breakdown (it runs one more step, each dispatch in its own pass).
    #[arg(long)]
    pub(crate) no_kernels: bool,
    /// Kernel rows to print (the JSON has all).
    #[arg(long, default_value_t = 20)]
    pub(crate) top: usize,
    /// Print the result as one JSON object on the last line.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Loads a base model and says what of its checkpoint was not loaded.
pub(crate) fn load_model(path: &std::path::Path) -> Result<portalora::model::Weights, portalora::model::ModelError> {
    let w = portalora::model::load_model(path)?;
    if let Some(l) = &w.left_out {
        errln!("note: {}: {l}", path.display());
    }
    Ok(w)
}

/// Refuses, before any work, a path flag naming nothing: `--model nothere.gguf: no such file or
/// folder` (the flag said, not just the operating system's "os error 2").
pub(crate) fn check_inputs(named: &[(&str, Option<&Path>)]) -> Result<(), String> {
    match named.iter().find_map(|(flag, p)| p.filter(|p| !p.exists()).map(|p| (flag, p))) {
        Some((flag, p)) => Err(format!("{flag} {}: no such file or folder", p.display())),
        None => Ok(()),
    }
}

/// A number in any usual form: 1e-08, 16.0, 0.5.
pub(crate) fn parse_number(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{s:?} is not a finite number"));
    }
    Ok(v)
}

/// A non-negative whole number, also written as 8.0 or 1e3.
pub(crate) fn parse_count(s: &str) -> Result<usize, String> {
    let v = parse_number(s)?;
    if v < 0.0 || v.fract() != 0.0 || v > usize::MAX as f64 {
        return Err(format!("{s:?} is not a non-negative whole number"));
    }
    Ok(v as usize)
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PathArg {
    Auto,
    Portable,
    Subgroup,
}

/// When the process started (main's first line), and when its GPU context was ready: the
/// start-up `bench step` reports.
pub(crate) static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
pub(crate) static CONTEXT_READY: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    STARTED.get_or_init(std::time::Instant::now);
    let matches = match with_config_file(Cli::command().get_matches()) {
        Ok(m) => m,
        Err(e) => {
            errln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let given: Given = match matches.subcommand() {
        Some((name, m)) => Cli::command().find_subcommand(name).map(|c| given(m, c)).unwrap_or_default(),
        None => Given::new(),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = run(cli, &given);
    // Output to a closed pipe ends the command quietly (train's run stopped after its step); any
    // other error is still said on stderr.
    match result {
        Ok(_) if output::closed() => ExitCode::from(output::CLOSED_STATUS),
        Err(e) if broken_pipe(&*e) => ExitCode::from(output::CLOSED_STATUS),
        Ok(code) => code,
        Err(e) => {
            let message = e.to_string();
            errln!("error: {message}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                // Errors that quote their source in their own message are not repeated.
                let cause = s.to_string();
                if !message.contains(&cause) {
                    errln!("  caused by: {cause}");
                }
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// Whether `e`, or an error it came from, is a write to a closed pipe.
fn broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(s) = src {
        if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return true;
        }
        src = s.source();
    }
    false
}

/// The ids of the arguments of `cmd` given explicitly (not defaults; argument groups left out).
fn given(m: &ArgMatches, cmd: &clap::Command) -> Given {
    cmd.get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| m.value_source(id) == Some(ValueSource::CommandLine))
        .map(str::to_string)
        .collect()
}

/// `train --config FILE`: the TOML file's keys become flags placed before the command line's,
/// which therefore override them (the train command lets a later flag override an earlier one).
fn with_config_file(m: ArgMatches) -> Result<ArgMatches, Box<dyn std::error::Error>> {
    let Some(("train", t)) = m.subcommand() else { return Ok(m) };
    let Some(path) = t.get_one::<PathBuf>("config") else { return Ok(m) };
    check_inputs(&[("--config", Some(path))])?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| format!("{}: not TOML: {e}", path.display()))?;
    let mut argv: Vec<String> = std::env::args().take(1).collect();
    argv.push("train".into());
    let train = Cli::command().find_subcommand("train").cloned().expect("the train command");
    for (key, value) in &table {
        check_config_key(&train, path, key, value)?;
        let flag = flag(key);
        let text = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                other => Err(format!("{}: {key} = {other:?} is not a string or number", path.display())),
            }
        };
        match value {
            toml::Value::Boolean(true) => argv.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) if key == "prompt" => {
                for it in items {
                    argv.extend([flag.clone(), text(it)?]);
                }
            }
            toml::Value::Array(items) => {
                let parts = items.iter().map(text).collect::<Result<Vec<_>, _>>()?;
                argv.extend([flag, parts.join(",")]);
            }
            v => argv.extend([flag, text(v)?]),
        }
    }
    let given: Vec<String> = std::env::args().skip_while(|a| a != "train").skip(1).collect();
    argv.extend(given);
    Cli::command().try_get_matches_from(argv).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// A config file's key is one of `train`'s flags (without dashes; `resume` too), true or false
/// only for a switch; a file does not name another config. (Values clap reads are checked by
/// clap.)
fn check_config_key(train: &clap::Command, path: &Path, key: &str, value: &toml::Value) -> Result<(), String> {
    let long = flag(key);
    let arg = train.get_arguments().find(|a| {
        a.get_long().is_some_and(|l| format!("--{l}") == long)
            || a.get_all_aliases().is_some_and(|al| al.iter().any(|l| format!("--{l}") == long))
    });
    if arg.is_some_and(|a| a.get_id() == "config") {
        return Err(format!("{}: config = ...: a config file does not name another; merge them", path.display()));
    }
    let Some(arg) = arg else {
        return Err(format!(
            "{}: {key} is not a setting of train (keys are its flags without dashes, e.g. lr = 1e-3; \
             see portalora train --help)",
            path.display()
        ));
    };
    let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
    match (value, switch) {
        (toml::Value::Boolean(b), false) => {
            Err(format!("{}: {key} = {b}: {key} takes a value, not true or false", path.display()))
        }
        (v, true) if !v.is_bool() => Err(format!("{}: {key} is a switch: use {key} = true or false", path.display())),
        _ => Ok(()),
    }
}

fn run(cli: Cli, given: &Given) -> Result<ExitCode, Box<dyn std::error::Error>> {
    check_command_inputs(&cli.command)?;
    if let Command::Inspect { model } = &cli.command {
        show::inspect(model)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Tokenize(args) = &cli.command {
        tokenize::tokenize(args)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Export(args) = &cli.command {
        export::export(args)?;
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = pollster::block_on(Context::with_options(context_options(&cli.command)?))?;
    CONTEXT_READY.get_or_init(|| STARTED.get().map_or(0.0, |s| s.elapsed().as_secs_f64()));
    match cli.command {
        Command::Inspect { .. } | Command::Tokenize(_) | Command::Export(_) => unreachable!("handled above"),
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            chat_template,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            adapter,
            special,
            json,
        } => {
            check_sampler(temperature, given)?;
            let sampling = portalora::model::generate::Sampling { temperature, top_k, top_p, seed };
            let input = match (prompt, chat) {
                (Some(p), _) => infer::Input::Text(p),
                (None, Some(user)) => infer::Input::Chat { user, system, template: chat_template },
                (None, None) => unreachable!("clap requires one"),
            };
            infer::generate(
                &ctx,
                &model,
                input,
                max_tokens,
                sampling,
                adapter.as_deref(),
                infer::Show { special, json },
            )?
        }
        Command::Eval { model, ids, data, chat_template, train_on, no_packing, seq, batch, adapter, json } => {
            check_eval_flags(ids.is_some(), given)?;
            let chat = infer::Chat { template: chat_template.as_deref(), train_on, no_packing };
            infer::eval(&ctx, &model, ids.as_deref(), data.as_deref(), chat, seq, batch, adapter.as_deref(), json)?
        }
        Command::Train(args) => return train::train(&ctx, *args, given),
        Command::Merge { model, adapter, out, overwrite } => merge::merge(&ctx, &model, &adapter, &out, overwrite)?,
        Command::Info { json } => show::info(&ctx, json)?,
        Command::Bench { what: BenchWhat::Step(args) } => show::bench_step(&ctx, *args)?,
        Command::Bench { what: BenchWhat::Coop { size } } => show::bench_coop(&ctx, size)?,
        Command::Bench { what: BenchWhat::Matmul { json, path, repeats, seconds, shapes } } => {
            show::bench_matmul(&ctx, json, path, repeats, seconds, &shapes)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The paths a command reads, checked before it starts (train checks its own, with --resume).
fn check_command_inputs(command: &Command) -> Result<(), String> {
    fn p(p: &Path) -> Option<&Path> {
        Some(p)
    }
    fn o(p: &Option<PathBuf>) -> Option<&Path> {
        p.as_deref()
    }
    match command {
        Command::Inspect { model } => check_inputs(&[("--model", p(model))]),
        Command::Eval { model, ids, data, chat_template, adapter, .. } => check_inputs(&[
            ("--model", p(model)),
            ("--ids", o(ids)),
            ("--data", o(data)),
            ("--chat-template", o(chat_template)),
            ("--adapter", o(adapter)),
        ]),
        Command::Generate { model, chat_template, adapter, .. } => {
            check_inputs(&[("--model", p(model)), ("--chat-template", o(chat_template)), ("--adapter", o(adapter))])
        }
        Command::Merge { model, adapter, .. } => check_inputs(&[("--model", p(model)), ("--adapter", p(adapter))]),
        Command::Tokenize(a) => a.check_inputs(),
        Command::Export(a) => a.check_inputs(),
        Command::Train(a) => a.check_inputs(),
        Command::Bench { what: BenchWhat::Step(a) } => check_inputs(&[("--model", p(&a.model))]),
        Command::Info { .. } | Command::Bench { .. } => Ok(()),
    }
}

/// The GPU context's options from the environment (a value the engine does not know is an error).
fn context_options(command: &Command) -> Result<portalora::gpu::ContextOptions, Box<dyn std::error::Error>> {
    let mut opts = portalora::gpu::ContextOptions::from_env()?;
    // The cooperative-matrix benchmark runs the path whatever the autotune would say.
    if matches!(command, Command::Bench { what: BenchWhat::Coop { .. } }) && opts.coop != CoopMode::Off {
        opts.coop = CoopMode::On;
    }
    Ok(opts)
}

/// Refuses sampling flags given with `--temperature 0`, which samples nothing.
fn check_sampler(temperature: f32, given: &Given) -> Result<(), Box<dyn std::error::Error>> {
    let sampler: Vec<String> =
        ["top_k", "top_p", "seed"].iter().filter(|id| given.contains(**id)).map(|id| flag(id)).collect();
    if temperature == 0.0 && !sampler.is_empty() {
        return Err(format!(
            "{} not used with --temperature 0, which picks the most likely token; give --temperature T > 0 \
             to sample",
            sampler.join(", ") + if sampler.len() == 1 { " is" } else { " are" }
        )
        .into());
    }
    Ok(())
}

/// Refuses `eval` flags that shape text into rows when `--ids` (token rows already) is given.
fn check_eval_flags(ids: bool, given: &Given) -> Result<(), Box<dyn std::error::Error>> {
    for id in ["seq", "chat_template", "train_on", "no_packing"] {
        if ids && given.contains(id) {
            return Err(format!("{} is not used with --ids (the file holds token rows); drop it", flag(id)).into());
        }
    }
    Ok(())
}
