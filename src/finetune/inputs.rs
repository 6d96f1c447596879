//! What a run reads: token-id files, data through [`crate::data`], and the prompts it samples.

use std::path::Path;

use super::{file_err, io_err, FinetuneError, Result, RunConfig};
use crate::data::{self, Row};
use crate::gpu::Context;
use crate::io::chat::{ChatTemplate, Message};
use crate::io::tokenizer::{Tokenizer, TokenizerError};
use crate::model::generate::{Generator, Sampling};
use crate::model::weights::Weights;
use crate::run::RunData;

/// Reads `{"input_ids": [[...], ...]}`: rows of equal length, at least 2 tokens each.
pub fn read_ids(path: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| FinetuneError::Json {
        path: path.to_path_buf(),
        what: "not JSON: ",
        source,
    })?;
    let rows = v["input_ids"].as_array().ok_or_else(|| file_err(path, "expected {\"input_ids\": [[...], ...]}"))?;
    // Every token of a row is trained: `labels`, or an `attention_mask` with zeros (padding),
    // beside the ids would mask some, and are refused rather than dropped. An all-ones mask (what
    // `json.dump(tokenizer(texts))` writes without padding) says nothing more.
    let ones = |m: &serde_json::Value| {
        let row_ones = |r: &serde_json::Value| r.as_array().is_some_and(|r| r.iter().all(|x| x.as_u64() == Some(1)));
        m.as_array().is_some_and(|rows| rows.iter().all(row_ones))
    };
    if v.get("attention_mask").is_some_and(|m| !ones(m)) {
        return Err(file_err(
            path,
            "has an attention_mask with zeros (padding?): --ids rows are trained on every token, padding \
             included; give rows of real tokens, of equal length, without the mask",
        ));
    }
    if let Some(other) = v.as_object().and_then(|o| o.keys().find(|k| *k != "input_ids" && *k != "attention_mask")) {
        return Err(file_err(
            path,
            format!(
                "has {other:?}, which portalora does not read: --ids rows are input_ids only, every token a \
                 target; give the text (--data) to mask with --train-on, or drop {other:?}"
            ),
        ));
    }
    let mut out = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let row = row.as_array().ok_or_else(|| file_err(path, format!("input_ids[{r}] is not a list")))?;
        let ids = row
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(|| file_err(path, format!("input_ids[{r}][{i}] = {x} is not a token id")))
            })
            .collect::<Result<Vec<u32>>>()?;
        out.push(ids);
    }
    let len = out.first().map(Vec::len).unwrap_or(0);
    if len < 2 {
        return Err(file_err(path, "rows need at least 2 tokens to predict one"));
    }
    if let Some(r) = out.iter().position(|row| row.len() != len) {
        return Err(file_err(
            path,
            format!(
                "input_ids[{r}] has {} tokens but input_ids[0] has {len}; rows must be of equal length",
                out[r].len()
            ),
        ));
    }
    Ok(out)
}

/// Rows for training and validation, each with its loss mask (every row carries one: a
/// document's and a row's first tokens are never targets; `--ids` rows predict every token).
pub(super) fn load_data(
    cfg: &RunConfig,
    tok: Option<&Tokenizer>,
    model: &crate::model::ModelConfig,
) -> Result<RunData> {
    match (&cfg.ids, &cfg.data) {
        (Some(p), _) => {
            let rows = read_ids(p)?;
            for (r, row) in rows.iter().enumerate() {
                if let Some((i, id)) = row.iter().enumerate().find(|(_, &id)| id as usize >= model.vocab_size) {
                    return Err(file_err(
                        p,
                        format!(
                            "input_ids[{r}][{i}] = {id} is outside the model's vocabulary of {} tokens",
                            model.vocab_size
                        ),
                    ));
                }
            }
            model.check_seq(rows[0].len()).map_err(|e| file_err(p, e))?;
            let train = rows
                .into_iter()
                .map(|ids| Row { predict: vec![true; ids.len()], pos: (0..ids.len() as u32).collect(), ids })
                .collect();
            Ok(RunData { train, val: Vec::new(), chat: None, summary: None, fixed: true })
        }
        (None, Some(p)) => {
            if let Err(e) = model.check_seq(cfg.seq) {
                let max = model.usable_positions();
                return Err(FinetuneError::Config(format!("--seq {}: {e}; use --seq {max} or less", cfg.seq)));
            }
            let tok = tok.ok_or_else(|| {
                file_err(&cfg.model, "has no tokenizer (tokenizer.json or vocab.json + merges.txt); use --ids")
            })?;
            let model_name = cfg.model.display().to_string();
            let chat = data::ChatOptions {
                template_file: cfg.chat_template.as_deref(),
                train_on: cfg.train_on.unwrap_or_default(),
                model: &model_name,
                given: &data::chat_flags(cfg.chat_template.as_deref(), cfg.train_on),
            };
            let packing = if cfg.no_packing { data::Packing::PerDocument } else { data::Packing::Packed };
            let ds = data::load_with(p, tok, &chat, packing, cfg.seq, cfg.val_fraction, cfg.adapter.seed)?;
            let chat = match ds.summary.conversations {
                0 => None,
                _ => tok
                    .chat_template(cfg.chat_template.as_deref())
                    .map_err(|source| data::DataError::Template { path: p.clone(), source })?,
            };
            Ok(RunData { train: ds.train, val: ds.val, chat, summary: Some(ds.summary), fixed: false })
        }
        (None, None) => {
            Err(FinetuneError::Config("give --ids FILE.json or --data FILE (text, folder or JSONL)".into()))
        }
    }
}

/// Greedy continuations of `prompts` by the frozen weights `params` with `adapter`'s branch
/// (unmerged) when given.
pub(super) fn samples(
    ctx: &Context,
    w: &Weights,
    params: &crate::model::gpu::ParameterTensors,
    adapter: Option<&dyn crate::adapter::Adapter>,
    tok: &Tokenizer,
    prompts: &[String],
    chat: Option<&ChatTemplate>,
    n: usize,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut stop: Vec<u32> = tok.eos_id.into_iter().collect();
    if let Some(t) = chat {
        let end = t.end_of_turn().map_err(TokenizerError::from)?;
        stop.extend(tok.encode(&end)?.first());
    }
    for p in prompts {
        let err = |e: TokenizerError| FinetuneError::Prompt { prompt: p.clone(), source: e };
        let ids = match chat {
            // A user message with the assistant's turn opened; the template writes BOS itself.
            Some(t) => {
                let text = t.render(&[Message::new("user", p)], true).map_err(|e| err(e.into()))?;
                tok.encode_with_offsets(&text).map_err(err)?.0
            }
            None => tok.encode_text(p).map_err(err)?,
        };
        if ids.is_empty() {
            continue;
        }
        let max_len = (ids.len() + n).min(w.config.usable_positions());
        let mut g = Generator::new(ctx, &w.config, params, max_len)?;
        if let Some(a) = adapter {
            g = g.with_adapter(a)?;
        }
        let mut new = Vec::new();
        g.generate(ctx, &ids, n, Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }, &stop, |t| new.push(t))?;
        let text = tok.decode_text(&new)?;
        out.push((p.clone(), text));
    }
    Ok(out)
}
