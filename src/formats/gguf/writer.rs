//! GGUF v3 writing, streamed: the header (metadata and every tensor's descriptor) is laid out
//! first from the tensors' shapes and types, then each tensor's bytes are produced and written
//! in order, so memory holds about one tensor. The file appears whole or not at all (a
//! temporary sibling, fsync, rename).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::dequant::{byte_size, DequantError};

/// GGUF's default (and llama.cpp's expected) data alignment.
pub const ALIGNMENT: usize = 32;

/// A metadata value, typed as gguf-py's `GGUFWriter.add_*` types it (llama.cpp checks types).
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
    BoolArray(Vec<bool>),
    U32Array(Vec<u32>),
}

impl Meta {
    pub fn str(s: impl Into<String>) -> Meta {
        Meta::Str(s.into())
    }
}

/// One tensor to write: its GGUF name, row-major shape and GGUF type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: u32,
}

impl TensorSpec {
    fn bytes(&self) -> Result<usize, DequantError> {
        byte_size(self.ggml_type, self.shape.iter().product())
    }
}

/// A failed GGUF write; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("tensor {name}: {msg}")]
    Tensor { name: String, msg: String },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, v: &Meta) {
    // gguf value types: 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array.
    let array = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend(9u32.to_le_bytes());
        out.extend(ty.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
    };
    match v {
        Meta::U32(x) => {
            out.extend(4u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::I32(x) => {
            out.extend(5u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::F32(x) => {
            out.extend(6u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::Bool(x) => {
            out.extend(7u32.to_le_bytes());
            out.push(*x as u8);
        }
        Meta::Str(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
        }
        Meta::StrArray(a) => {
            array(out, 8, a.len());
            a.iter().for_each(|s| put_str(out, s));
        }
        Meta::I32Array(a) => {
            array(out, 5, a.len());
            a.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Meta::U32Array(a) => {
            array(out, 4, a.len());
            a.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Meta::F32Array(a) => {
            array(out, 6, a.len());
            a.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Meta::BoolArray(a) => {
            array(out, 7, a.len());
            a.iter().for_each(|x| out.push(*x as u8));
        }
    }
}

/// The header bytes (up to the aligned start of the data) and each tensor's data size.
pub fn header(meta: &[(String, Meta)], tensors: &[TensorSpec]) -> Result<(Vec<u8>, Vec<usize>), WriteError> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        put_meta(&mut out, v);
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let size = t.bytes().map_err(|e| WriteError::Tensor { name: t.name.clone(), msg: e.to_string() })?;
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += size.div_ceil(ALIGNMENT) * ALIGNMENT;
        sizes.push(size);
    }
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    Ok((out, sizes))
}

/// Writes a GGUF file at `path`: `meta`, then the tensors in `tensors`' order, each tensor's
/// bytes from `data(i)` (checked against its declared size). A failure (or a full disk) leaves
/// nothing at `path`. Returns the file's size.
pub fn write<E>(
    path: &Path,
    meta: &[(String, Meta)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, E>,
) -> Result<u64, E>
where
    E: From<WriteError>,
{
    let (head, sizes) = header(meta, tensors)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| WriteError::Io { what, path: p, source }
    };
    // Removes the temporary file unless the rename happened.
    struct Cleanup<'a>(&'a Path, bool);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = fs::remove_file(self.0);
            }
        }
    }
    let mut guard = Cleanup(&tmp, false);
    let file = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&head).map_err(io("writing", &tmp))?;
    let mut total = head.len() as u64;
    for (i, t) in tensors.iter().enumerate() {
        full_disk_injected(total).map_err(io("writing", &tmp))?;
        let bytes = data(i)?;
        if bytes.len() != sizes[i] {
            let msg = format!("produced {} bytes, its shape and type need {}", bytes.len(), sizes[i]);
            return Err(WriteError::Tensor { name: t.name.clone(), msg }.into());
        }
        w.write_all(&bytes).map_err(io("writing", &tmp))?;
        let pad = sizes[i].div_ceil(ALIGNMENT) * ALIGNMENT - sizes[i];
        w.write_all(&[0u8; ALIGNMENT][..pad]).map_err(io("writing", &tmp))?;
        total += (sizes[i] + pad) as u64;
    }
    let file = w.into_inner().map_err(|e| io("writing", &tmp)(e.into_error()))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io("cannot rename a temporary file to", path))?;
    guard.1 = true;
    Ok(total)
}

/// Tests only (the `fault-injection` feature): `FT_FULL_DISK_GGUF=N` fails the write like a full
/// disk once N bytes are written.
fn full_disk_injected(written: u64) -> std::io::Result<()> {
    #[cfg(feature = "fault-injection")]
    if std::env::var("FT_FULL_DISK_GGUF").ok().and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| written >= n) {
        return Err(std::io::Error::other("No space left on device (injected: FT_FULL_DISK_GGUF)"));
    }
    let _ = written;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::dequant::{F32, Q8_0};
    use super::super::reader::{GgufFile, Value};
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ft-gguf-writer-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn writes_what_the_reader_reads() {
        let dir = tempdir("ok");
        let path = dir.join("t.gguf");
        let meta = vec![
            ("general.architecture".to_string(), Meta::str("llama")),
            ("llama.block_count".to_string(), Meta::U32(2)),
            ("llama.rope.freq_base".to_string(), Meta::F32(10000.0)),
            ("tokenizer.ggml.tokens".to_string(), Meta::StrArray(vec!["a".into(), "b".into()])),
            ("tokenizer.ggml.token_type".to_string(), Meta::I32Array(vec![1, 3])),
            ("x.flag".to_string(), Meta::Bool(true)),
        ];
        let tensors = vec![
            TensorSpec { name: "a".into(), shape: vec![3], ggml_type: F32 },
            TensorSpec { name: "b".into(), shape: vec![2, 32], ggml_type: Q8_0 },
        ];
        let data = |i: usize| -> Result<Vec<u8>, WriteError> {
            Ok(if i == 0 { [1f32, 2.0, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect() } else { vec![7u8; 68] })
        };
        let size = write(&path, &meta, &tensors, data).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get("llama.block_count"), Some(&Value::U64(2)));
        assert_eq!(g.get("tokenizer.ggml.token_type").unwrap().as_array().unwrap()[1], Value::I64(3));
        assert_eq!(g.get("x.flag"), Some(&Value::Bool(true)));
        assert_eq!(g.tensors[1].shape(), vec![2, 32]);
        assert_eq!(g.tensors[1].offset % ALIGNMENT as u64, 0);
        assert_eq!(g.tensor_bytes(&g.tensors[1]).unwrap(), &[7u8; 68][..]);
        assert_eq!(g.tensor_bytes(&g.tensors[0]).unwrap()[4..8], 2f32.to_le_bytes());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_tensor_leaves_no_file() {
        let dir = tempdir("fail");
        let path = dir.join("t.gguf");
        let tensors = vec![TensorSpec { name: "a".into(), shape: vec![4], ggml_type: F32 }];
        let err = write(&path, &[], &tensors, |_| -> Result<Vec<u8>, WriteError> { Ok(vec![0; 3]) }).unwrap_err();
        assert!(err.to_string().contains("produced 3 bytes"), "{err}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }
}
