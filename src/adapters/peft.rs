//! PEFT adapter directories onto and from a model: [`PeftAdapter::attach`] puts a saved
//! adapter's LoRA matrices on the model's projections, [`save`] writes the model's adapters in
//! PEFT's format (the file format itself is `formats::peft`).

use std::path::Path;

use super::config::{LoraConfig, Targets};
use crate::formats::peft::{self, AdapterFiles, LoraMatrices, PeftError};
use crate::formats::safetensors::RawTensors;
use crate::model::projection::{Adapter, Lora};
use crate::model::Decoder;
use crate::ops::Kernels;

/// A PEFT adapter read from disk: its settings and its tensors.
pub struct PeftAdapter {
    pub files: AdapterFiles,
    pub config: LoraConfig,
}

impl PeftAdapter {
    pub fn open(dir: &Path) -> Result<Self, PeftError> {
        let files = AdapterFiles::open(dir)?;
        let config = LoraConfig::from_peft(&files.config, &dir.join("adapter_config.json"))?;
        Ok(PeftAdapter { files, config })
    }

    /// The LoRA matrices of `module` (PEFT layout), if the adapter has them; tensors for a
    /// module the config does not cover (`target_modules`, `exclude_modules`,
    /// `layers_to_transform`) are an error, never applied.
    pub fn matrices(&self, module: &str, d_in: usize, d_out: usize) -> Result<Option<LoraMatrices>, PeftError> {
        let m = self.files.matrices(module, d_in, d_out)?;
        if m.is_some() && !self.config.covers(module) {
            let msg = format!(
                "adapter_model.safetensors has tensors for {module}, which the config leaves out (target_modules, exclude_modules, layers_to_transform)"
            );
            return Err(PeftError::Invalid { path: self.files.dir.join("adapter_config.json"), msg });
        }
        Ok(m)
    }

    /// Checks that every module `target_modules` names (as names, not a pattern) exists among
    /// `modules`, the model's module paths.
    pub fn check_targets<'a>(&self, modules: impl IntoIterator<Item = &'a str> + Clone) -> Result<(), PeftError> {
        if let Targets::Names(names) = &self.config.targets {
            for t in names {
                if !modules.clone().into_iter().any(|m| Targets::Names(vec![t.clone()]).matches(m)) {
                    let msg = format!("target_modules names {t:?}, which this model does not have");
                    return Err(PeftError::Invalid { path: self.files.dir.join("adapter_config.json"), msg });
                }
            }
        }
        Ok(())
    }

    /// Attaches the adapters to `model`; every adapter tensor must find its module. Returns how
    /// many projections got one.
    pub fn attach<B: Kernels>(&self, model: &mut Decoder<B>) -> Result<usize, PeftError> {
        let device = model.device();
        let (r, scale) = (self.config.r, self.config.scale());
        let modules: Vec<String> = model.projections_mut().into_iter().map(|(name, _)| name).collect();
        self.check_targets(modules.iter().map(String::as_str))?;
        let mut n = 0;
        for (name, proj) in model.projections_mut() {
            let (d_in, d_out) = proj.dims();
            if let Some((a, b)) = self.matrices(&name, d_in, d_out)? {
                proj.adapter = Some(Adapter::Lora(Lora::from_peft(&a, &b, r, d_in, d_out, scale, &device)));
                n += 1;
            }
        }
        let dir = &self.files.dir;
        self.files.tensors.check_all_used().map_err(|e| PeftError::Invalid { path: dir.clone(), msg: format!("the adapter does not fit this model: {e}") })?;
        if n == 0 {
            return Err(PeftError::Invalid { path: dir.clone(), msg: "the adapter has no LoRA tensors for this model's modules".into() });
        }
        Ok(n)
    }
}

impl PeftAdapter {
    /// Puts this adapter on `model` as the frozen reference (`Projection::reference`): DPO's
    /// reference when training continues from this adapter, as TRL's frozen "ref" adapter.
    /// Returns how many projections got one.
    pub fn attach_reference<B: Kernels>(&self, model: &mut Decoder<B>) -> Result<usize, PeftError> {
        let device = model.device();
        let (r, scale) = (self.config.r, self.config.scale());
        let mut n = 0;
        for (name, proj) in model.projections_mut() {
            let (d_in, d_out) = proj.dims();
            if let Some((a, b)) = self.matrices(&name, d_in, d_out)? {
                proj.reference = Some(Adapter::Lora(Lora::from_peft(&a, &b, r, d_in, d_out, scale, &device).frozen()));
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Writes `model`'s adapters as a PEFT adapter directory (`adapter_config.json` with PEFT's keys,
/// `adapter_model.safetensors` in f32 with `{"format": "pt"}`), atomically. An adapter trained on
/// an NF4 base says so in a marker file, so that `ft merge` merges into the same weights.
pub fn save<B: Kernels>(model: &mut Decoder<B>, config: &LoraConfig, base_model: &str, out: &Path) -> Result<(), PeftError> {
    let mut tensors: RawTensors = Vec::new();
    let mut short: Vec<String> = Vec::new();
    let mut nf4_base = false;
    for (name, proj) in model.projections_mut() {
        nf4_base |= proj.base.is_nf4();
        let Some(Adapter::Lora(l)) = &proj.adapter else { continue };
        let (a, b) = l.to_peft();
        let (d_in, d_out) = proj.dims();
        let (an, bn) = peft::tensor_names(&name);
        tensors.push((an, safetensors::Dtype::F32, vec![l.rank(), d_in], bytemuck::cast_slice(&a).to_vec()));
        tensors.push((bn, safetensors::Dtype::F32, vec![d_out, l.rank()], bytemuck::cast_slice(&b).to_vec()));
        let s = name.rsplit('.').next().unwrap_or(&name).to_string();
        if !short.contains(&s) {
            short.push(s);
        }
    }
    if tensors.is_empty() {
        return Err(PeftError::Invalid { path: out.into(), msg: "the model has no adapters to save".into() });
    }
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": short,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": config.init.peft_value(),
        "inference_mode": true,
        "modules_to_save": null,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let base = nf4_base.then(|| serde_json::json!({"quantization": "nf4", "blocksize": crate::quant::nf4::BLOCKSIZE, "double_quant": true}));
    peft::write(out, &tensors, &cfg, base.as_ref())
}
