//! `portalora eval` and `portalora generate`.

use std::io::Write;
use std::path::Path;

use portalora::gpu::Context;
use portalora::io::chat::Message;
use portalora::io::tokenizer::Tokenizer;
use portalora::model::generate::{Generator, Sampling};
use portalora::model::gpu::{BaseDType, GpuModel, ParameterTensors};

type Res = Result<(), Box<dyn std::error::Error>>;

/// Rows, where some tokens are not targets (prompt/completion or chat data) their loss masks,
/// and for packed documents each token's position in its document.
type Rows = (Vec<Vec<u32>>, Option<Vec<Vec<bool>>>, Option<Vec<Vec<u32>>>);

/// The chat flags of `eval`.
#[derive(Clone, Copy)]
pub(crate) struct Chat<'a> {
    pub template: Option<&'a Path>,
    pub train_on: Option<portalora::data::TrainOn>,
    pub no_packing: bool,
}

/// Token rows from `--ids`, or from `--data` read exactly as `train --data` reads it (text,
/// folders, JSONL; documents packed into rows of `seq`; no validation split).
fn read_rows(
    model: &Path,
    ids: Option<&Path>,
    data: Option<&Path>,
    chat: Chat,
    seq: usize,
) -> Result<Rows, Box<dyn std::error::Error>> {
    match (ids, data) {
        (Some(p), _) => Ok((portalora::finetune::read_ids(p)?, None, None)),
        (None, Some(p)) => {
            // As train says it.
            let tok = Tokenizer::for_model(model)
                .map_err(|source| portalora::finetune::FinetuneError::NoTokenizer { source })?;
            let name = model.display().to_string();
            let given = portalora::data::chat_flags(chat.template, chat.train_on);
            let opts = portalora::data::ChatOptions {
                template_file: chat.template,
                train_on: chat.train_on.unwrap_or_default(),
                model: &name,
                given: &given,
            };
            let packing =
                if chat.no_packing { portalora::data::Packing::PerDocument } else { portalora::data::Packing::Packed };
            let ds = portalora::data::load_with(p, &tok, &opts, packing, seq, 0.0, 0)?;
            errln!("{}: {}", p.display(), ds.summary.scored());
            for n in &ds.summary.notes {
                errln!("note: {n}");
            }
            // Rows of documents carry their masks: a document's first token is never a target.
            let masks = Some(ds.train.iter().map(|r| r.predict.clone()).collect());
            let positions = Some(ds.train.iter().map(|r| r.pos.clone()).collect());
            Ok((ds.train.into_iter().map(|r| r.ids).collect(), masks, positions))
        }
        (None, None) => Err("give --ids FILE.json or --data FILE (text, a folder of texts, or JSONL)".into()),
    }
}

/// Mean next-token cross-entropy over the target positions, printed (or as JSON).
#[allow(clippy::too_many_arguments)] // one argument per command-line flag
pub(crate) fn eval(
    ctx: &Context,
    model: &Path,
    ids: Option<&Path>,
    data: Option<&Path>,
    chat: Chat,
    seq: usize,
    batch: usize,
    adapter: Option<&Path>,
    json: bool,
) -> Res {
    let weights = crate::load_model(model)?;
    if data.is_some() {
        // As train says it: the flag, the model's limit and the fix.
        if let Err(e) = weights.config.check_seq(seq) {
            let max = weights.config.usable_positions();
            return Err(format!("--seq {seq}: {e}; use --seq {max} or less").into());
        }
    }
    let (rows, masks, positions) = read_rows(model, ids, data, chat, seq)?;
    if let (Some(p), Err(e)) = (ids, weights.config.check_seq(rows[0].len())) {
        return Err(format!("{}: {e}", p.display()).into());
    }
    let seq = rows[0].len();
    let batch = batch.clamp(1, rows.len());
    let gpu = match adapter {
        Some(dir) => portalora::train::model_with_adapter(ctx, &weights, batch, seq, dir)?,
        None => GpuModel::new(ctx, &weights, batch, seq)?,
    };
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (i, chunk) in rows.chunks(batch).enumerate() {
        let mask = masks.as_ref().map(|m| &m[i * batch..i * batch + chunk.len()]);
        let pos = positions.as_ref().map(|p| &p[i * batch..i * batch + chunk.len()]);
        let (s, n) = portalora::gpu::block_on(gpu.loss_sum_docs_async(ctx, chunk, mask, pos))?;
        sum += s;
        count += n;
    }
    let loss = sum / count.max(1) as f64;
    if json {
        outln!("{{\"loss\": {loss}, \"tokens\": {count}}}");
    } else {
        outln!("loss {loss:.6} over {count} predicted tokens (perplexity {:.3})", loss.exp());
    }
    Ok(())
}

/// What `generate` continues: text as it stands, or a user message in the chat template.
pub(crate) enum Input {
    Text(String),
    Chat { user: String, system: Option<String>, template: Option<std::path::PathBuf> },
}

/// A prompt's ids, the text to echo and the stop tokens (see [`prompt_ids`]).
type Prompt = (Vec<u32>, String, Vec<u32>);

/// The prompt's ids, the text to echo, and the tokens that end generation (end of text; for a
/// chat, also the first token of the template's end-of-turn text).
fn prompt_ids(tok: &Tokenizer, model: &Path, input: Input) -> Result<Prompt, Box<dyn std::error::Error>> {
    let mut stop: Vec<u32> = tok.eos_id.into_iter().collect();
    match input {
        Input::Text(p) => Ok((tok.encode_text(&p)?, p, stop)),
        Input::Chat { user, system, template } => {
            let t = tok.chat_template(template.as_deref())?.ok_or_else(|| {
                format!("{} has no chat template; pass one with --chat-template FILE, or use --prompt", model.display())
            })?;
            let mut msgs: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
            msgs.push(Message::new("user", &user));
            let text = t.render(&msgs, true)?;
            // The template writes its own BOS and turn markers: nothing is added.
            let (ids, _) = tok.encode_with_offsets(&text)?;
            let (end, _) = tok.encode_with_offsets(&t.end_of_turn()?)?;
            stop.extend(end.first());
            // The reply alone is printed (`portalora tokenize` shows what the template renders).
            let _ = text;
            Ok((ids, String::new(), stop))
        }
    }
}

/// How `generate` prints.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Show {
    /// Special tokens (end of turn, end of text) too.
    pub special: bool,
    /// One JSON line at the end: {"prompt_ids", "ids", "text"} (the prompt's and the new tokens).
    pub json: bool,
}

/// Continues the input, printing as it goes; says why it stopped when that was not the end of
/// the text or `max_tokens`.
pub(crate) fn generate(
    ctx: &Context,
    model: &Path,
    input: Input,
    max_tokens: usize,
    sampling: Sampling,
    adapter: Option<&Path>,
    show: Show,
) -> Res {
    check_sampling(&sampling)?;
    let tok = Tokenizer::for_model(model)?;
    let weights = crate::load_model(model)?;
    let (ids, prompt, stop) = prompt_ids(&tok, model, input)?;
    let context = weights.config.usable_positions();
    check_prompt(&ids, context)?;
    // The frozen weights as the file stores them (a GGUF's quantized tensors stay quantized) and
    // the adapter's branch beside them, unmerged.
    let params = ParameterTensors::upload_as(ctx, &weights, None, BaseDType::Auto)?;
    let max_len = (ids.len() + max_tokens).min(context);
    let adapter = adapter.map(|dir| load_adapter(ctx, &weights, &params, dir, max_len)).transpose()?;
    let mut gen = Generator::new(ctx, &weights.config, &params, max_len)?;
    if let Some(a) = &adapter {
        gen = gen.with_adapter(a.as_ref())?;
    }
    let mut out = std::io::stdout().lock();
    if !show.json {
        write!(out, "{prompt}")?;
        out.flush()?;
    }
    // Decode the whole continuation each time and print what is new, so that multi-byte
    // characters split across tokens come out whole.
    let mut new_ids = Vec::new();
    let mut printed = 0;
    let mut err = None;
    let special = show.special;
    let got = gen.generate(ctx, &ids, max_tokens, sampling, &stop, |t| {
        new_ids.push(t);
        if show.json {
            return;
        }
        let text = if special { tok.decode(&new_ids) } else { tok.decode_text(&new_ids) };
        match text {
            Ok(text) if !text.ends_with('\u{fffd}') => {
                // A closed stdout ends the command at once: nothing is left to save.
                if write!(out, "{}", &text[printed.min(text.len())..]).and_then(|_| out.flush()).is_err() {
                    crate::output::stdout_closed();
                }
                printed = text.len();
            }
            Ok(_) => {}
            Err(e) => err = Some(e),
        }
    })?;
    if show.json {
        let text = if special { tok.decode(&got)? } else { tok.decode_text(&got)? };
        writeln!(out, "{}", serde_json::json!({"prompt_ids": ids, "ids": got, "text": text}))?;
    } else {
        writeln!(out)?;
    }
    if let Some(e) = err {
        return Err(e.into());
    }
    let ended = got.last().is_some_and(|t| stop.contains(t));
    if !ended && got.len() < max_tokens {
        errln!("(stopped after {} new tokens: the model's context of {context} positions is full)", got.len());
    }
    Ok(())
}

/// Refuses a temperature below 0 (or not finite) and a top-p outside (0, 1].
fn check_sampling(sampling: &Sampling) -> Res {
    if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
        return Err(format!("--temperature {} must be 0 or positive", sampling.temperature).into());
    }
    if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        return Err(format!("--top-p {} must be in (0, 1]", sampling.top_p).into());
    }
    Ok(())
}

/// Refuses an empty prompt and one that leaves no room in the model's `context` positions.
fn check_prompt(ids: &[u32], context: usize) -> Res {
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    if ids.len() >= context {
        return Err(format!(
            "the prompt has {} tokens, but the model's context holds {context}; shorten the prompt",
            ids.len()
        )
        .into());
    }
    Ok(())
}

/// The adapter saved in `dir`, bound to the frozen weights `params` it runs beside.
fn load_adapter(
    ctx: &Context,
    weights: &portalora::model::Weights,
    params: &ParameterTensors,
    dir: &Path,
    max_len: usize,
) -> Result<Box<dyn portalora::adapter::Adapter>, Box<dyn std::error::Error>> {
    let mut a = portalora::train::adapter_from(ctx, weights, dir, max_len.min(512))?;
    // What it reads of the frozen weights it runs beside (DoRA's norms).
    a.bind(ctx, portalora::model::gpu::site_bases(params, a.sites())?)?;
    Ok(a)
}
