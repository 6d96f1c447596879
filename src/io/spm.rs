//! SentencePiece vocabularies from GGUF (`tokenizer.ggml.model = "llama"`: Gemma's, Llama 2's),
//! built the way transformers builds them from the same file, so that ids equal its ids: a BPE
//! over the pieces with byte fallback, whose merges are recovered from the vocabulary (a GGUF
//! stores none) and ranked by the pieces' scores — for Gemma by the pieces' order in the file,
//! which its scores do not follow — with Gemma's or Llama's normaliser, pre-tokenizer and decoder.
//! Control and unknown pieces are matched whole as special tokens, user-defined ones as added
//! tokens.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

/// The pieces of a GGUF's SentencePiece vocabulary.
pub struct Pieces {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    /// llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub types: Vec<u32>,
    /// Gemma's rules (the architecture is gemma, gemma2 or gemma3) instead of Llama's.
    pub gemma: bool,
}

/// transformers' `generate_merges`: every split of every piece into two pieces of the vocabulary,
/// ordered best piece first (by `score`, higher first; then the longer left part, then the longer
/// right part), each piece's splits in the order of their parts' ids, and otherwise in the order
/// the pieces come (a stable sort, as Python's).
fn generate_merges(tokens: &[String], score: &dyn Fn(usize) -> f32) -> Vec<(String, String)> {
    // A dict built in file order: a repeated piece keeps its first place and its last id.
    let mut vocab: HashMap<&str, usize> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t.as_str(), i).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for piece in order {
        let s = score(vocab[piece]);
        let mut local: Vec<(&str, &str)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (vocab[l], vocab[r]));
        merges.extend(local.into_iter().map(|(l, r)| (s, l.chars().count(), r.chars().count(), l, r)));
    }
    // Descending and stable, as `sorted(…, reverse=True)`.
    merges.sort_by(|a, b| (b.0, b.1, b.2).partial_cmp(&(a.0, a.1, a.2)).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(_, _, _, l, r)| (l.to_string(), r.to_string())).collect()
}

/// The tokenizer transformers builds from these pieces (`GemmaTokenizer` or `LlamaTokenizer`).
pub fn build(p: &Pieces) -> tokenizers::Result<tokenizers::Tokenizer> {
    // Gemma files spell pieces of two or more spaces with real spaces; its tokenizer looks them
    // up as "▁▁".
    let tokens: Vec<String> = match p.gemma {
        true => {
            p.tokens
                .iter()
                .map(|t| {
                    if t.contains(' ') && t.trim().is_empty() {
                        "\u{2581}".repeat(t.chars().count())
                    } else {
                        t.clone()
                    }
                })
                .collect()
        }
        false => p.tokens.clone(),
    };
    let merges = match p.gemma {
        true => generate_merges(&tokens, &|i| -(i as f32)),
        false => generate_merges(&tokens, &|i| p.scores.get(i).copied().unwrap_or(0.0)),
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if p.gemma {
        bpe = bpe.unk_token("<unk>".into());
    }
    let mut t = tokenizers::Tokenizer::new(bpe.build()?);
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("\u{2581}", " ")?.into(), ByteFallback::default().into(), Fuse::default().into()];
    if p.gemma {
        t.with_normalizer(Some(Replace::new(" ", "\u{2581}")?));
        let split = Split::new(SplitPattern::String(" ".into()), SplitDelimiterBehavior::MergedWithPrevious, false);
        t.with_pre_tokenizer(Some(split?));
    } else {
        t.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', PrependScheme::First, false)));
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    t.with_decoder(Some(DecoderSequence::new(decoders)));
    // Unknown and control pieces are special; user-defined ones are matched whole but are text.
    let of_type = |want: &[u32]| -> Vec<&String> {
        tokens.iter().zip(&p.types).filter(|(_, ty)| want.contains(ty)).map(|(t, _)| t).collect()
    };
    let special: Vec<AddedToken> = of_type(&[2, 3]).into_iter().map(|s| AddedToken::from(s.clone(), true)).collect();
    t.add_special_tokens(&special);
    let user: Vec<AddedToken> =
        of_type(&[4]).into_iter().map(|s| AddedToken::from(s.clone(), false).normalized(false)).collect();
    t.add_tokens(&user);
    Ok(t)
}

/// One piece of a SentencePiece `tokenizer.model` (its `ModelProto`): the text, the score and the
/// type (SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
#[derive(Clone, Debug, PartialEq)]
pub struct ProtoPiece {
    pub piece: String,
    pub score: f32,
    pub kind: u32,
}

/// The pieces of a `tokenizer.model` file's bytes: field 1 of `ModelProto`, each a message of
/// `piece` (1), `score` (2) and `type` (3, default normal); every other field is skipped.
pub fn read_model_proto(bytes: &[u8]) -> Result<Vec<ProtoPiece>, String> {
    let mut pieces = Vec::new();
    let mut r = Proto(bytes);
    while let Some((field, value)) = r.next()? {
        if let (1, Wire::Bytes(msg)) = (field, value) {
            let mut p = ProtoPiece { piece: String::new(), score: 0.0, kind: 1 };
            let mut m = Proto(msg);
            while let Some((f, v)) = m.next()? {
                match (f, v) {
                    (1, Wire::Bytes(b)) => {
                        p.piece = String::from_utf8(b.to_vec()).map_err(|_| "a piece is not UTF-8".to_string())?
                    }
                    (2, Wire::Fixed32(x)) => p.score = f32::from_bits(x),
                    (3, Wire::Varint(x)) => p.kind = x as u32,
                    _ => {}
                }
            }
            pieces.push(p);
        }
    }
    if pieces.is_empty() {
        return Err("no pieces: not a SentencePiece model".into());
    }
    Ok(pieces)
}

/// A protobuf field's value, by wire type.
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A protobuf message being read field by field.
struct Proto<'a>(&'a [u8]);

impl<'a> Proto<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!("a field of {n} bytes where {} remain: the file is truncated", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// The next (field number, value), or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Wire::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Wire::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("wire type {w} is not protobuf's")),
        };
        Ok(Some((key >> 3, value)))
    }
}
