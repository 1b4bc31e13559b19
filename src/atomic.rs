//! Crash-safe output: files and directories appear whole or not at all (write to a temporary
//! sibling, fsync, rename).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed crash-safe write; each names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum AtomicError {
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{} already exists; choose another output directory or remove it", path.display())]
    Exists { path: PathBuf },
}

type Result<T> = std::result::Result<T, AtomicError>;

/// Attaches `what` and `path` to an I/O error.
trait At<T> {
    fn at(self, what: &'static str, path: &Path) -> Result<T>;
}

impl<T> At<T> for std::io::Result<T> {
    fn at(self, what: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| AtomicError::Io { what, path: path.into(), source })
    }
}

/// Writes `bytes` to `path` via a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    let mut f = File::create(&tmp).at("cannot create", &tmp)?;
    f.write_all(bytes).at("writing", &tmp)?;
    f.sync_all().at("syncing", &tmp)?;
    drop(f);
    fs::rename(&tmp, path).at("cannot rename a temporary file to", path)?;
    Ok(())
}

fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A directory built under a temporary name and renamed into place by [`StagedDir::commit`].
/// Dropped without commit, it is removed.
pub struct StagedDir {
    pub tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Stages `target`, which must not exist yet (or be an empty directory).
    pub fn new(target: &Path) -> Result<Self> {
        if target.exists() {
            let empty = target.is_dir() && fs::read_dir(target).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !empty {
                return Err(AtomicError::Exists { path: target.into() });
            }
        }
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent).at("cannot create", parent)?;
        let tmp = tmp_sibling(target);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).ok();
        }
        fs::create_dir(&tmp).at("cannot create (is the output directory writable?)", &tmp)?;
        Ok(StagedDir { tmp, target: target.into(), committed: false })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// fsyncs every file and renames the directory into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        for entry in fs::read_dir(&self.tmp).at("cannot read", &self.tmp)? {
            let p = entry.at("cannot read", &self.tmp)?.path();
            if p.is_file() {
                File::open(&p).and_then(|f| f.sync_all()).at("syncing", &p)?;
            }
        }
        if self.target.exists() {
            fs::remove_dir(&self.target).at("cannot replace the empty directory", &self.target)?;
        }
        fs::rename(&self.tmp, &self.target).at("cannot rename the staged directory into", &self.target)?;
        if let Some(parent) = self.target.parent() {
            if let Ok(d) = File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }) {
                d.sync_all().ok();
            }
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            fs::remove_dir_all(&self.tmp).ok();
        }
    }
}
