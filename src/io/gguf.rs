//! GGUF files (llama.cpp's model format): header, metadata, tensor directory, and tensor data
//! dequantized to f32.
//!
//! Layout (little-endian): magic `GGUF`, version (2 or 3), tensor count, metadata count; the
//! metadata key/value pairs; one entry per tensor (name, dims innermost first, ggml type, offset
//! relative to the data section); padding to `general.alignment` (default 32); the data.
//! GGUF lists dimensions innermost first (`ne[0]` is the contiguous one); [`TensorInfo::shape`]
//! is in PyTorch order (outermost first), so a weight `[out, in]` reads as `shape = [out, in]`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::half::{bf16_to_f32, f16_to_f32};
use super::quants;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (it starts with {magic:?}, not \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (only 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: corrupt GGUF header at byte {offset}: {message}")]
    Corrupt { path: PathBuf, offset: u64, message: String },
    #[error(
        "{path}: tensor {name:?} has ggml type {ty} ({type_name}), which portalora cannot read; supported: F32, F16, \
         BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: convert the model to one of them \
         (llama.cpp's llama-quantize, e.g. to Q4_K_M)"
    )]
    UnsupportedType { path: PathBuf, name: String, ty: u32, type_name: &'static str },
    #[error("{path}: no tensor named {name:?}")]
    NoTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?} ({what}) lies past the end of the file ({file_len} bytes); the file is truncated or its header lies")]
    PastEnd { path: PathBuf, name: String, what: String, file_len: u64 },
}

type Result<T> = std::result::Result<T, GgufError>;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as u64 (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// Any number as f64; an f32 as the shortest decimal that reads back as it (the value the
    /// converter wrote: 1e-6, not 9.99999997e-7, in an exported config.json).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.to_string().parse().unwrap_or(v as f64)),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v as f64),
            Value::I16(v) => Some(v as f64),
            Value::I32(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The ggml tensor types portalora reads (named as ggml names them).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32: f16 scale d, 32 × i8 q; x = d·q.
    Q8_0,
    /// Blocks of 32: f16 scale d, 16 bytes of nibbles; x = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = d·q + m.
    Q4_1,
    /// Blocks of 32: f16 d, 32 high bits, 16 bytes of nibbles; x = d·(q − 16).
    Q5_0,
    /// Blocks of 32: f16 d, f16 m, 32 high bits, 16 bytes of nibbles; x = d·q + m.
    Q5_1,
    /// Super-blocks of 256 (see `io::quants`): 2-bit quants, 4-bit scales and mins per 16.
    Q2_K,
    /// 3-bit quants (2 bits + a high-bit mask), 6-bit scales per 16.
    Q3_K,
    /// 4-bit quants, 6-bit scales and mins per 32.
    Q4_K,
    /// 5-bit quants (4 bits + high bits), 6-bit scales and mins per 32.
    Q5_K,
    /// 6-bit quants (4 bits + 2 high bits), int8 scales per 16.
    Q6_K,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// ggml's number for the type (as GGUF stores it).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Every type portalora reads and writes.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The type named `name` as ggml or `--type` spells it (any case: `q4_k`, `Q4_K`, `f16`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q2_K => (256, 84),
            GgmlType::Q3_K => (256, 110),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
        }
    }
    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }
}

/// ggml type names for error messages about types we do not read.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16..=23 | 29 => "an IQ type",
        34 | 35 => "a ternary TQ type",
        39 => "MXFP4",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        _ => "unknown",
    }
}

/// One tensor's directory entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// PyTorch order: outermost first, the contiguous dimension last.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed GGUF file; tensor data is read from disk on demand (or from memory, for files that
/// came as bytes, as in a browser).
#[derive(Debug)]
pub struct Gguf {
    /// The file, or the name the bytes were given under.
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    file_len: u64,
    bytes: Option<std::sync::Arc<Vec<u8>>>,
}

/// Upper bounds that keep a lying header from making us allocate without limit.
const MAX_STRING: u64 = 1 << 24;
const MAX_ARRAY: u64 = 1 << 28;
const MAX_DIMS: u32 = 8;

struct Parser<R> {
    r: R,
    pos: u64,
    path: PathBuf,
}

impl<R: Read> Parser<R> {
    fn corrupt(&self, message: impl Into<String>) -> GgufError {
        GgufError::Corrupt { path: self.path.clone(), offset: self.pos, message: message.into() }
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.corrupt("the file ends inside the header")
            } else {
                GgufError::Io { path: self.path.clone(), source: e }
            }
        })?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(self.corrupt(format!("a string claims {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.r.read_exact(&mut buf).map_err(|_| self.corrupt("the file ends inside a string"))?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| self.corrupt("a string is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt("arrays nested too deeply"));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                if n > MAX_ARRAY {
                    return Err(self.corrupt(format!("an array claims {n} elements")));
                }
                let mut v = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            t => return Err(self.corrupt(format!("unknown metadata value type {t}"))),
        })
    }
}

impl Gguf {
    /// Reads the header and tensor directory of `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        Self::parse(BufReader::new(file), path, file_len, None)
    }

    /// Parses a GGUF file held in memory; `name` stands for its path in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        let bytes = std::sync::Arc::new(bytes);
        let len = bytes.len() as u64;
        Self::parse(std::io::Cursor::new(bytes.as_slice()), PathBuf::from(name), len, Some(bytes.clone()))
    }

    fn parse<R: Read>(r: R, path: PathBuf, file_len: u64, bytes: Option<std::sync::Arc<Vec<u8>>>) -> Result<Self> {
        let mut p = Parser { r, pos: 0, path: path.clone() };
        let magic: [u8; 4] = p.bytes().map_err(|_| GgufError::BadMagic { path: path.clone(), magic: [0; 4] })?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { path, magic });
        }
        let version = p.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path, version });
        }
        let n_tensors = p.u64()?;
        let n_kv = p.u64()?;
        // Each entry takes at least 8 bytes: a count larger than the file is a lie.
        if n_tensors > file_len / 8 || n_kv > file_len / 8 {
            return Err(
                p.corrupt(format!("{n_tensors} tensors and {n_kv} metadata entries cannot fit in {file_len} bytes"))
            );
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = p.string()?;
            let ty = p.u32()?;
            let value = p.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = p.string()?;
            let n_dims = p.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(p.corrupt(format!("tensor {name:?} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(p.u64()?);
            }
            let ty = p.u32()?;
            let offset = p.u64()?;
            raw.push((name, dims, ty, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(p.corrupt(format!("general.alignment is {alignment}, not a power of two")));
        }
        let data_start = p.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty_id, rel) in raw {
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| GgufError::UnsupportedType {
                path: path.clone(),
                name: name.clone(),
                ty: ty_id,
                type_name: ggml_type_name(ty_id),
            })?;
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= u32::MAX as u64 * 16);
            let Some(numel) = numel else {
                return Err(p.corrupt(format!("tensor {name:?} has absurd dimensions {dims:?}")));
            };
            let (per_block, block_bytes) = ty.block();
            if dims[0] % per_block != 0 {
                return Err(p.corrupt(format!(
                    "tensor {name:?} of type {ty:?} has an innermost dimension {} that is not a multiple of its block size {per_block}",
                    dims[0]
                )));
            }
            let bytes = numel / per_block * block_bytes;
            let offset =
                data_start.checked_add(rel).ok_or_else(|| p.corrupt(format!("tensor {name:?} offset overflows")))?;
            if offset.checked_add(bytes).is_none_or(|end| end > file_len) {
                return Err(GgufError::PastEnd {
                    path: path.clone(),
                    name,
                    what: format!("{bytes} bytes at offset {offset}"),
                    file_len,
                });
            }
            let shape = dims.iter().rev().map(|&d| d as usize).collect();
            tensors.push(TensorInfo { name, shape, ty, offset, bytes });
        }
        Ok(Gguf { path, version, metadata, tensors, file_len, bytes })
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::NoTensor { path: self.path.clone(), name: name.to_string() })
    }

    /// The raw bytes of a tensor as stored.
    pub fn raw(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        let io = |source| GgufError::Io { path: self.path.clone(), source };
        if info.offset + info.bytes > self.file_len {
            return Err(GgufError::PastEnd {
                path: self.path.clone(),
                name: info.name.clone(),
                what: format!("{} bytes at offset {}", info.bytes, info.offset),
                file_len: self.file_len,
            });
        }
        if let Some(b) = &self.bytes {
            return Ok(b[info.offset as usize..(info.offset + info.bytes) as usize].to_vec());
        }
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(info.offset)).map_err(io)?;
        let mut buf = vec![0u8; info.bytes as usize];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// A tensor dequantized to f32, row-major in [`TensorInfo::shape`] order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name)?;
        let raw = self.raw(info)?;
        Ok(dequantize(info.ty, &raw))
    }
}

/// Dequantizes whole blocks of `ty` to f32 (`raw.len()` must be a multiple of the block size).
pub fn dequantize(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let h = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    match ty {
        GgmlType::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        GgmlType::F16 => raw.chunks_exact(2).map(|c| f16_to_f32(h(c, 0))).collect(),
        GgmlType::BF16 => raw.chunks_exact(2).map(|c| bf16_to_f32(h(c, 0))).collect(),
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(raw.len() / 34 * 32);
            for b in raw.chunks_exact(34) {
                let d = f16_to_f32(h(b, 0));
                out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
            }
            out
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (bytes, offset) = if ty == GgmlType::Q4_0 { (18, 2) } else { (20, 4) };
            let mut out = Vec::with_capacity(raw.len() / bytes * 32);
            for b in raw.chunks_exact(bytes) {
                let d = f16_to_f32(h(b, 0));
                let qs = &b[offset..offset + 16];
                // Element j < 16 is the low nibble of byte j; element 16 + j the high nibble.
                let (lo, hi): (Vec<u8>, Vec<u8>) = qs.iter().map(|&q| (q & 0x0f, q >> 4)).unzip();
                if ty == GgmlType::Q4_0 {
                    out.extend(lo.iter().chain(&hi).map(|&q| d * (q as f32 - 8.0)));
                } else {
                    let m = f16_to_f32(h(b, 2));
                    out.extend(lo.iter().chain(&hi).map(|&q| d * q as f32 + m));
                }
            }
            out
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => blocks(raw, ty, |b, out| quants::q5(b, ty == GgmlType::Q5_1, out)),
        GgmlType::Q2_K => blocks(raw, ty, quants::q2k),
        GgmlType::Q3_K => blocks(raw, ty, quants::q3k),
        GgmlType::Q4_K | GgmlType::Q5_K => blocks(raw, ty, |b, out| quants::q4k_q5k(b, ty == GgmlType::Q5_K, out)),
        GgmlType::Q6_K => blocks(raw, ty, quants::q6k),
    }
}

/// Applies a block dequantizer to every whole block of `raw`.
fn blocks(raw: &[u8], ty: GgmlType, f: impl Fn(&[u8], &mut Vec<f32>)) -> Vec<f32> {
    let (n, bytes) = ty.block();
    let mut out = Vec::with_capacity(raw.len() / bytes as usize * n as usize);
    for b in raw.chunks_exact(bytes as usize) {
        f(b, &mut out);
    }
    out
}
