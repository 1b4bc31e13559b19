//! The run directory, apart from checkpoints: `recipe.resolved.toml` (what the run was started
//! with; `--resume` refuses another), `metrics.jsonl` (one JSON line per step and per eval),
//! `loss.svg` (train and eval loss against step, a small standalone SVG a person can open) and
//! `summary.json`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{IoAt, TrainError};
use crate::atomic::write_atomic;

/// An open run directory.
pub struct RunDir {
    pub path: PathBuf,
    metrics: Option<std::fs::File>,
    /// `completions.jsonl`, opened at the first step that has sampled completions (GRPO).
    completions: Option<std::fs::File>,
    resolved: String,
    lock: Option<Lock>,
    /// TensorBoard event file (`report_to = ["tensorboard"]`); dropped at its first failure.
    tb: Option<crate::formats::tfevents::EventWriter>,
    /// A warning for the user, once (the TensorBoard file could not be written).
    warning: Option<String>,
    tb_writes: usize,
}

/// `RUN/.lock`, holding the pid of the process training in the directory; removed when the run
/// ends (a killed run leaves it, and its dead pid marks it stale).
struct Lock(PathBuf);

impl Drop for Lock {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

/// Whether process `pid` is alive (Linux: `/proc/PID`; elsewhere every lock counts as live).
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

impl Lock {
    /// Takes the lock of the run in `dir`, refusing while another live process holds it.
    fn take(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).at("writing", &path)?;
                    return Ok(Lock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if pid != std::process::id() && alive(pid) => {
                            let msg = format!("another ft (pid {pid}) is training in this directory; wait for it, or stop it (its lock: {})", path.display());
                            return Err(TrainError::Invalid { path: dir.into(), msg });
                        }
                        // A killed run's lock: take it over.
                        _ => std::fs::remove_file(&path).at("cannot remove the stale lock", &path)?,
                    }
                }
                Err(e) => return Err(e).at("cannot create", &path),
            }
        }
        Err(TrainError::Invalid { path: dir.into(), msg: "cannot take the run's lock".into() })
    }
}

impl RunDir {
    /// Checks that a run can start in `path`: a new run needs it missing or empty; with
    /// `resume`, it must hold a run started with this very recipe (`resolved`). Nothing is
    /// written until [`Self::create`], so a run that fails while loading leaves nothing behind.
    pub fn open(path: &Path, resolved: &str, resume: bool) -> Result<Self, TrainError> {
        let non_empty = path.exists() && std::fs::read_dir(path).map(|mut d| d.next().is_some()).unwrap_or(false);
        let invalid = |msg: &str| TrainError::Invalid { path: path.into(), msg: msg.into() };
        if resume {
            let saved = std::fs::read_to_string(path.join("recipe.resolved.toml")).map_err(|_| invalid("--resume: this directory holds no run to resume"))?;
            if saved != resolved {
                let what = "the recipe differs from the run's recipe.resolved.toml".into();
                return Err(TrainError::Changed { run: path.into(), what, data: false });
            }
        } else if non_empty {
            return Err(invalid("the output directory already exists and is not empty (use --resume to continue it)"));
        }
        Ok(RunDir { path: path.into(), metrics: None, completions: None, resolved: resolved.into(), lock: None, tb: None, warning: None, tb_writes: 0 })
    }

    /// Creates the directory, takes its lock (refused while another live ft trains there) and
    /// saves the resolved recipe (a resumed run has it).
    pub fn create(&mut self) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.path).at("cannot create output directory", &self.path)?;
        self.lock = Some(Lock::take(&self.path)?);
        let recipe = self.path.join("recipe.resolved.toml");
        if !recipe.exists() {
            write_atomic(&recipe, self.resolved.as_bytes())?;
        }
        Ok(())
    }

    /// The summary of a run that already finished, if this one did.
    pub fn finished<S: serde::de::DeserializeOwned>(&self) -> Result<Option<S>, TrainError> {
        let path = self.path.join("summary.json");
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).at("cannot read", &path)?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| TrainError::Invalid { path, msg: format!("not a run summary: {e}") })
    }

    /// Opens `metrics.jsonl` for the steps after `step`, keeping only the lines of steps ≤ `step`
    /// (a resumed run drops what the interrupted one logged after its checkpoint).
    pub fn start_metrics(&mut self, step: usize) -> Result<(), TrainError> {
        self.metrics = Some(open_metrics(&self.path.join("metrics.jsonl"), step)?);
        Ok(())
    }

    fn metrics(&mut self) -> &mut std::fs::File {
        self.metrics.as_mut().expect("start_metrics is called before logging")
    }

    /// Starts a TensorBoard event file in `RUN/tb/` (a new file per start; a resumed run's
    /// TensorBoard shows the steps again from its checkpoint). A failure is a warning.
    pub fn enable_tensorboard(&mut self) {
        let dir = self.path.join("tb");
        match crate::formats::tfevents::EventWriter::create(&dir) {
            Ok(w) => self.tb = Some(w),
            Err(e) => self.warning = Some(format!("TensorBoard: cannot write in {}: {e}; metrics.jsonl stays the record", dir.display())),
        }
    }

    /// A warning the run should show, once.
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    /// Appends one line to `metrics.jsonl` (and its numbers to TensorBoard: `eval_*` keys as
    /// `eval/*`, the others as `train/*`, as transformers' TensorBoard callback names them).
    pub fn log(&mut self, line: &Value) -> Result<(), TrainError> {
        let path = self.path.join("metrics.jsonl");
        writeln!(self.metrics(), "{line}").at("writing", &path)?;
        if let (Some(tb), Some(obj)) = (self.tb.as_mut(), line.as_object()) {
            let step = obj.get("step").and_then(Value::as_i64).unwrap_or(0);
            let scalars: Vec<(String, f32)> = obj
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| v.as_f64().map(|x| (k, x as f32)))
                .map(|(k, x)| (k.strip_prefix("eval_").map_or_else(|| format!("train/{k}"), |r| format!("eval/{r}")), x))
                .collect();
            self.tb_writes += 1;
            let injected = cfg!(feature = "fault-injection") && std::env::var("FT_FAIL_TB_AT").ok().and_then(|v| v.parse::<usize>().ok()) == Some(self.tb_writes);
            let written = if injected { Err(std::io::Error::other("injected failure (FT_FAIL_TB_AT)")) } else { tb.scalars(step, &scalars) };
            if let Err(e) = written {
                self.warning = Some(format!("TensorBoard: cannot write {}: {e}; no more TensorBoard events this run, metrics.jsonl stays the record", tb.path.display()));
                self.tb = None;
            }
        }
        Ok(())
    }

    /// Appends step `step`'s sampled completions to `completions.jsonl` (each line gets the
    /// step). A resumed run first drops the lines of the steps after its checkpoint.
    pub fn log_samples(&mut self, step: usize, samples: Vec<Value>) -> Result<(), TrainError> {
        if samples.is_empty() {
            return Ok(());
        }
        let path = self.path.join("completions.jsonl");
        if self.completions.is_none() {
            self.completions = Some(open_metrics(&path, step - 1)?);
        }
        let file = self.completions.as_mut().expect("opened above");
        for mut s in samples {
            s["step"] = step.into();
            writeln!(file, "{s}").at("writing", &path)?;
        }
        Ok(())
    }

    /// fsyncs `metrics.jsonl` and `completions.jsonl` (before a checkpoint, and at the end).
    pub fn sync(&mut self) -> Result<(), TrainError> {
        let path = self.path.join("metrics.jsonl");
        self.metrics().sync_all().at("syncing", &path)?;
        if let Some(f) = &self.completions {
            f.sync_all().at("syncing", &self.path.join("completions.jsonl"))?;
        }
        Ok(())
    }

    /// Draws `loss.svg` from `metrics.jsonl`.
    pub fn write_loss_svg(&self) -> Result<(), TrainError> {
        let path = self.path.join("metrics.jsonl");
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for line in std::fs::read_to_string(&path).at("cannot read", &path)?.lines() {
            let v: Value = serde_json::from_str(line).map_err(|e| TrainError::Invalid { path: path.clone(), msg: e.to_string() })?;
            let step = v["step"].as_f64().unwrap_or(0.0);
            if let Some(l) = v["loss"].as_f64() {
                train.push((step, l));
            }
            if let Some(l) = v["eval_loss"].as_f64() {
                eval.push((step, l));
            }
        }
        Ok(write_atomic(&self.path.join("loss.svg"), loss_svg(&train, &eval).as_bytes())?)
    }

    /// Writes `summary.json`.
    pub fn write_summary(&self, summary: &impl serde::Serialize) -> Result<(), TrainError> {
        Ok(write_atomic(&self.path.join("summary.json"), &serde_json::to_vec_pretty(summary).expect("summary serializes"))?)
    }
}

/// Opens metrics.jsonl for appending, keeping only the lines of steps ≤ `keep_through`.
fn open_metrics(path: &Path, keep_through: usize) -> Result<std::fs::File, TrainError> {
    let kept: String = if keep_through == 0 {
        String::new()
    } else {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= keep_through)
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    write_atomic(path, kept.as_bytes())?;
    // Tests only (the `fault-injection` feature): `FT_FULL_DISK_METRICS` appends the step lines to
    // /dev/full, so every append fails as on a full disk.
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("FT_FULL_DISK_METRICS").is_some() {
        return std::fs::OpenOptions::new().append(true).open("/dev/full").at("cannot open", path);
    }
    std::fs::OpenOptions::new().append(true).open(path).at("cannot open", path)
}

/// Renders loss curves. `train` and `eval` are `(step, loss)` points.
pub fn loss_svg(train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let all = train.iter().chain(eval).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let line = |pts: &[(f64, f64)]| {
        pts.iter()
            .filter(|p| p.1.is_finite())
            .enumerate()
            .map(|(i, &(x, y))| format!("{}{:.1},{:.1}", if i == 0 { "M" } else { " L" }, sx(x), sy(y)))
            .collect::<String>()
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#444"/>
<text x="{pad}" y="{ty}">step {x0:.0}</text><text x="{r}" y="{ty}" text-anchor="end">step {x1:.0}</text>
<text x="{lx}" y="{b}" text-anchor="end">{y0:.3}</text><text x="{lx}" y="{pad}" text-anchor="end">{y1:.3}</text>
<path d="{tr}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
<path d="{ev}" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/>
<text x="{r}" y="20" text-anchor="end"><tspan fill="#1f77b4">train loss</tspan>  <tspan fill="#d62728">eval loss</tspan></text>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        ty = h - pad + 18.0,
        lx = pad - 4.0,
        tr = line(train),
        ev = line(eval),
    );
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_both_curves() {
        let s = super::loss_svg(&[(1.0, 3.0), (2.0, 2.0), (3.0, 1.5)], &[(3.0, 1.8)]);
        assert!(s.starts_with("<svg") && s.contains("M48.0,") && s.contains("eval loss"));
    }
}
