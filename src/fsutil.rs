//! Crash-safe output: files and directories appear whole or not at all (write to a temporary
//! sibling, fsync, rename).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Writes `bytes` to `path` via a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
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
                bail!("{} already exists; choose another output directory or remove it", target.display());
            }
        }
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = tmp_sibling(target);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).ok();
        }
        fs::create_dir(&tmp).with_context(|| format!("cannot create {} (is the output directory writable?)", tmp.display()))?;
        Ok(StagedDir { tmp, target: target.into(), committed: false })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// fsyncs every file and renames the directory into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        for entry in fs::read_dir(&self.tmp)? {
            let p = entry?.path();
            if p.is_file() {
                File::open(&p)?.sync_all().with_context(|| format!("syncing {}", p.display()))?;
            }
        }
        if self.target.exists() {
            fs::remove_dir(&self.target).with_context(|| format!("replacing empty {}", self.target.display()))?;
        }
        fs::rename(&self.tmp, &self.target).with_context(|| format!("renaming into {}", self.target.display()))?;
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
