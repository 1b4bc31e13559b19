//! A cache of tokenized data, so that a resumed or repeated run does not render and tokenize
//! its data again. An entry is keyed by the sha256 of the data files' bytes, the tokenizer
//! (`tokenizer.json`), the chat template's source and a settings string; it is one binary file
//! (`tokens-KEY.bin`: count, then per sample its length, u32 ids and u8 mask), written
//! atomically. A missing, truncated or mismatched entry is simply recomputed.

use std::path::{Path, PathBuf};

use sha2::Digest;

use super::conversation::expand_data_path;
use super::encode::Encoded;

/// The key of `data` tokenized with the tokenizer in `model_dir`, `template` and `settings`.
pub fn key(data: &Path, model_dir: &Path, template: &str, settings: &str) -> std::io::Result<String> {
    let mut h = sha2::Sha256::new();
    let files = expand_data_path(data).map_err(std::io::Error::other)?;
    for f in files.iter().chain(std::iter::once(&model_dir.join("tokenizer.json"))) {
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        std::io::copy(&mut std::fs::File::open(f)?, &mut h)?;
    }
    h.update(template.as_bytes());
    h.update(settings.as_bytes());
    Ok(h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect())
}

fn path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("tokens-{key}.bin"))
}

/// The cached samples (text not kept), if the entry exists and is whole.
pub fn load(dir: &Path, key: &str) -> Option<Vec<Encoded>> {
    let bytes = std::fs::read(path(dir, key)).ok()?;
    let mut at = 0;
    let u32_at = |at: &mut usize| -> Option<u32> {
        let v = u32::from_le_bytes(bytes.get(*at..*at + 4)?.try_into().ok()?);
        *at += 4;
        Some(v)
    };
    let n = u32_at(&mut at)? as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = u32_at(&mut at)? as usize;
        let ids = (0..len).map(|_| u32_at(&mut at)).collect::<Option<Vec<u32>>>()?;
        let mask = bytes.get(at..at + len)?.to_vec();
        at += len;
        out.push(Encoded { text: String::new(), ids, mask });
    }
    (at == bytes.len()).then_some(out)
}

/// Writes the entry (atomically).
pub fn store(dir: &Path, key: &str, samples: &[Encoded]) -> Result<(), crate::atomic::AtomicError> {
    let mut bytes = Vec::with_capacity(4 + samples.iter().map(|s| 4 + 5 * s.ids.len()).sum::<usize>());
    bytes.extend_from_slice(&(samples.len() as u32).to_le_bytes());
    for s in samples {
        bytes.extend_from_slice(&(s.ids.len() as u32).to_le_bytes());
        for id in &s.ids {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        bytes.extend_from_slice(&s.mask);
    }
    std::fs::create_dir_all(dir).map_err(|source| crate::atomic::AtomicError::Io { what: "cannot create", path: dir.into(), source })?;
    crate::atomic::write_atomic(&path(dir, key), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_a_miss() {
        let dir = std::env::temp_dir().join(format!("ft-cache-test-{}", std::process::id()));
        let s = vec![
            Encoded { text: "x".into(), ids: vec![1, 2, 70000], mask: vec![0, 1, 1] },
            Encoded { text: String::new(), ids: vec![], mask: vec![] },
        ];
        store(&dir, "k", &s).unwrap();
        let back = load(&dir, "k").unwrap();
        assert_eq!(back.iter().map(|e| (&e.ids, &e.mask)).collect::<Vec<_>>(), s.iter().map(|e| (&e.ids, &e.mask)).collect::<Vec<_>>());
        let p = path(&dir, "k");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(load(&dir, "k").is_none());
        assert!(load(&dir, "other").is_none());
        std::fs::remove_dir_all(&dir).ok();
    }
}
