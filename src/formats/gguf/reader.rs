//! GGUF file format (v2/v3): header, metadata key/values and tensor descriptors, memory-mapped.
//! Spec: ggml's `docs/gguf.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a GGUF file ({msg})")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: metadata key {key}: {msg}")]
    Key { path: PathBuf, key: String, msg: String },
    #[error("{path}: tensor {name}: {msg}")]
    Tensor { path: PathBuf, name: String, msg: String },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(x) => Some(*x),
            Value::I64(x) if *x >= 0 => Some(*x as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(x) => Some(*x),
            Value::U64(x) => Some(*x as f64),
            Value::I64(x) => Some(*x as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's descriptor. `dims` are GGUF's (fastest first); the row-major shape is reversed.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape (PyTorch order).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    /// Elements; `usize::MAX` when hostile dims overflow (the size check then refuses it).
    pub fn numel(&self) -> usize {
        self.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).and_then(|n| usize::try_from(n).ok()).unwrap_or(usize::MAX)
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    mmap: Mmap,
    pub metadata: BTreeMap<String, Value>,
    /// Each key's GGUF value type (4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, ...), and
    /// for arrays the item type after it.
    pub value_types: BTreeMap<String, Vec<u32>>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

/// Why the bytes are not GGUF.
#[derive(Debug, thiserror::Error)]
enum ParseError {
    #[error("unexpected end of file")]
    Eof,
    #[error("invalid UTF-8 string: {0}")]
    Utf8(std::string::FromUtf8Error),
    #[error("arrays nested too deeply")]
    TooDeep,
    #[error("array length {0} exceeds the file size")]
    ArrayTooLong(usize),
    #[error("unknown metadata value type {0}")]
    UnknownType(u32),
}

type Parsed<T> = Result<T, ParseError>;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Parsed<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(ParseError::Eof)?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Parsed<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Parsed<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Parsed<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Parsed<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Parsed<String> {
        let n = self.u64()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(ParseError::Utf8)
    }
    fn value(&mut self, ty: u32, depth: usize) -> Parsed<Value> {
        Ok(match ty {
            0 => Value::U64(self.u8()? as u64),
            1 => Value::I64(self.u8()? as i8 as i64),
            2 => Value::U64(self.u16()? as u64),
            3 => Value::I64(self.u16()? as i16 as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(ParseError::TooDeep);
                }
                let ity = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.buf.len() {
                    return Err(ParseError::ArrayTooLong(n));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ity, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(ParseError::UnknownType(t)),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path).map_err(|source| GgufError::Io { path: path.into(), source })?;
        // SAFETY: read-only map of a file that ft does not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Io { path: path.into(), source })?;
        let fmt = |e: ParseError| GgufError::Format { path: path.into(), msg: e.to_string() };
        let bad = |msg: String| GgufError::Format { path: path.into(), msg };
        let mut c = Cursor { buf: &mmap, pos: 0 };
        if c.take(4).map_err(fmt)? != b"GGUF" {
            return Err(bad("bad magic, expected \"GGUF\"".into()));
        }
        let version = c.u32().map_err(fmt)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("unsupported GGUF version {version} (expected 2 or 3)")));
        }
        let n_tensors = c.u64().map_err(fmt)? as usize;
        let n_kv = c.u64().map_err(fmt)? as usize;
        let mut metadata = BTreeMap::new();
        let mut value_types = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string().map_err(fmt)?;
            let ty = c.u32().map_err(fmt)?;
            let item = if ty == 9 { c.buf.get(c.pos..c.pos + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap())) } else { None };
            value_types.insert(key.clone(), std::iter::once(ty).chain(item).collect());
            let v = c.value(ty, 0).map_err(|e| GgufError::Key { path: path.into(), key: key.clone(), msg: e.to_string() })?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20));
        for _ in 0..n_tensors {
            let name = c.string().map_err(fmt)?;
            let nd = c.u32().map_err(fmt)? as usize;
            if nd > 4 {
                return Err(GgufError::Tensor { path: path.into(), name, msg: format!("{nd} dimensions (at most 4)") });
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>, _>>().map_err(fmt)?;
            let ggml_type = c.u32().map_err(fmt)?;
            let offset = c.u64().map_err(fmt)?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            // GGUF requires a power of two (llama.cpp refuses others); 0 would divide by zero.
            Some(v) => match v.as_u64().filter(|a| a.is_power_of_two() && *a <= 1 << 20) {
                Some(a) => a as usize,
                None => {
                    let msg = format!("{v:?} is not a power of two up to 2^20");
                    return Err(GgufError::Key { path: path.into(), key: "general.alignment".into(), msg });
                }
            },
        };
        let data_start = c.pos.div_ceil(align) * align;
        let g = GgufFile { path: path.into(), mmap, metadata, value_types, tensors, data_start };
        for t in &g.tensors {
            g.tensor_bytes(t)?;
        }
        Ok(g)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The bytes of a tensor, checked to lie inside the file.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8], GgufError> {
        let err = |msg: String| GgufError::Tensor { path: self.path.clone(), name: t.name.clone(), msg };
        let size = super::dequant::byte_size(t.ggml_type, t.numel()).map_err(|e| err(e.to_string()))?;
        let end = usize::try_from(t.offset).ok().and_then(|o| self.data_start.checked_add(o)).and_then(|s| s.checked_add(size));
        let end = end.filter(|&e| e <= self.mmap.len()).ok_or_else(|| {
            err(format!("data runs past the end of the file ({} bytes); the file is truncated", self.mmap.len()))
        })?;
        Ok(&self.mmap[end - size..end])
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}
