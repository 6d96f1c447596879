//! GGUF files out: metadata and tensors laid out as llama.cpp's `gguf-py` writes them (version 3,
//! little-endian, tensor data aligned to `general.alignment`, 32 unless the metadata says
//! otherwise), built in memory so that they can be written atomically or handed to a browser.
//! [`super::gguf::Gguf`] reads them back.

use std::collections::BTreeMap;

use super::gguf::{GgmlType, Value};

/// One tensor to write: its name, PyTorch-order shape (outermost first) and bytes as stored.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

/// A GGUF file being assembled: metadata (in insertion order, `general.architecture` first as
/// the converters write it) and tensors (in the order given).
#[derive(Clone, Debug, Default)]
pub struct GgufOut {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<OutTensor>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's number for a value's type.
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array keeps no element type; gguf-py writes those as arrays of u8 too.
            out.extend(items.first().map(type_id).unwrap_or(0).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x);
            }
        }
    }
}

impl GgufOut {
    /// Sets `key` (replacing an earlier value, keeping its place).
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self
            .metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two())
            .unwrap_or(32) as usize;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.shape.len() as u32).to_le_bytes());
            // GGUF lists dimensions innermost first.
            for d in t.shape.iter().rev() {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(t.ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + t.bytes.len()).next_multiple_of(align);
        }
        out.resize(out.len().next_multiple_of(align), 0);
        for t in &self.tensors {
            out.extend(&t.bytes);
            out.resize(out.len().next_multiple_of(align), 0);
        }
        out
    }
}

/// The metadata of a parsed file, `general.architecture` first (the order the converters use;
/// the reader keeps keys sorted).
pub fn metadata_in_order(metadata: &BTreeMap<String, Value>) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::with_capacity(metadata.len());
    let first = ["general.architecture"];
    for k in first {
        if let Some(v) = metadata.get(k) {
            out.push((k.to_string(), v.clone()));
        }
    }
    out.extend(metadata.iter().filter(|(k, _)| !first.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())));
    out
}
