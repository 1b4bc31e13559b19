//! PEFT adapter directories onto and from a model: [`PeftAdapter::attach`] puts a saved
//! adapter's LoRA matrices on the model's projections, [`save`] writes the model's adapters in
//! PEFT's format (the file format itself is `formats::peft`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::config::{LoraConfig, Targets};
use crate::formats::peft::{self, AdapterFiles, LoraMatrices, PeftError};
use crate::formats::safetensors::RawTensors;
use crate::model::projection::{Adapter, Dora, Full, Lora};
use crate::model::Decoder;
use crate::ops::Kernels;

/// A PEFT adapter read from disk: its settings and its tensors.
pub struct PeftAdapter {
    pub files: AdapterFiles,
    pub config: LoraConfig,
    /// Expert stacks already split per expert, by `stack.param`.
    stacks: Mutex<HashMap<String, Option<Arc<Vec<LoraMatrices>>>>>,
}

/// A checkpoint's expert module (`<layer>.mlp.experts.<e>.gate_proj`, Mixtral's
/// `<layer>.block_sparse_moe.experts.<e>.w1`, …) as ft's expert projection: (stack, e, param,
/// which rows of the projection's output it is: `Some(0)` gate, `Some(1)` up, `None` all).
fn checkpoint_expert(module: &str) -> Option<(String, usize, &'static str, Option<usize>)> {
    let (rest, part) = module.rsplit_once('.')?;
    let (stack, e) = rest.rsplit_once('.')?;
    let e: usize = e.parse().ok()?;
    let layer = stack.strip_suffix(".mlp.experts").or_else(|| stack.strip_suffix(".block_sparse_moe.experts"))?;
    let (param, half) = match part {
        "gate_proj" | "w1" => ("gate_up_proj", Some(0)),
        "up_proj" | "w3" => ("gate_up_proj", Some(1)),
        "down_proj" | "w2" => ("down_proj", None),
        _ => return None,
    };
    Some((format!("{layer}.mlp.experts"), e, param, half))
}

impl PeftAdapter {
    pub fn open(dir: &Path) -> Result<Self, PeftError> {
        let files = AdapterFiles::open(dir)?;
        let config = LoraConfig::from_peft(&files.config, &dir.join("adapter_config.json"))?;
        Ok(PeftAdapter { files, config, stacks: Mutex::new(HashMap::new()) })
    }

    /// The per-expert matrices of expert stack `stack.param` whose projections are
    /// `[d_in → d_out]`, if the adapter holds it (read and split once).
    pub fn stack(&self, stack: &str, param: &str, d_in: usize, d_out: usize) -> Result<Option<Arc<Vec<LoraMatrices>>>, PeftError> {
        let key = format!("{stack}.{param}");
        if let Some(hit) = self.stacks.lock().expect("poisoned").get(&key) {
            return Ok(hit.clone());
        }
        let r = self.config.rank_for(&format!("{stack}.0.{param}"));
        let (an, _) = peft::stack_tensor_names(stack, param, &self.config.target_parameters);
        let n = self.files.tensors.info(&an).map_or(0, |(shape, _)| shape.first().copied().unwrap_or(0) / r.max(1));
        let got = if n == 0 { None } else { self.files.stack_matrices(stack, param, &self.config.target_parameters, n, r, d_in, d_out)?.map(Arc::new) };
        self.stacks.lock().expect("poisoned").insert(key, got.clone());
        Ok(got)
    }

    /// The LoRA matrices of expert projection `stack.<e>.param`, or of a checkpoint module that
    /// is part of one (a gate or up half: those rows of B).
    fn expert_matrices(&self, module: &str, d_in: usize, d_out: usize) -> Result<Option<(String, LoraMatrices)>, PeftError> {
        let (stack, e, param, half) = match peft::expert_projection(module) {
            Some((stack, e, param)) => (stack.to_string(), e, if param == "gate_up_proj" { "gate_up_proj" } else { "down_proj" }, None),
            None => match checkpoint_expert(module) {
                Some(x) => x,
                None => return Ok(None),
            },
        };
        let stack_out = if half.is_some() { 2 * d_out } else { d_out };
        let Some(all) = self.stack(&stack, param, d_in, stack_out)? else { return Ok(None) };
        let Some((a, b)) = all.get(e) else {
            let msg = format!("{module}: the adapter's {stack}.{param} has {} experts", all.len());
            return Err(PeftError::Invalid { path: self.files.dir.join("adapter_model.safetensors"), msg });
        };
        let r = a.len() / d_in;
        let b = match half {
            Some(h) => b[h * d_out * r..(h + 1) * d_out * r].to_vec(),
            None => b.clone(),
        };
        Ok(Some((format!("{stack}.{e}.{param}"), (a.clone(), b))))
    }

    /// The LoRA matrices of `module` (PEFT layout), if the adapter has them; tensors for a
    /// module the config does not cover (`target_modules`, `target_parameters`,
    /// `exclude_modules`, `layers_to_transform`) are an error, never applied. Expert modules
    /// (ft's fused `gate_up_proj`, or a checkpoint's per-expert `gate_proj`/`w1`, …) read PEFT's
    /// expert stacks.
    pub fn matrices(&self, module: &str, d_in: usize, d_out: usize) -> Result<Option<LoraMatrices>, PeftError> {
        if let Some((internal, m)) = self.expert_matrices(module, d_in, d_out)? {
            if !self.config.covers(&internal) {
                let msg = format!("adapter_model.safetensors has tensors for {internal}, which the config leaves out (target_parameters, exclude_modules, layers_to_transform)");
                return Err(PeftError::Invalid { path: self.files.dir.join("adapter_config.json"), msg });
            }
            return Ok(Some(m));
        }
        let m = self.files.matrices(module, self.config.rank_for(module), d_in, d_out)?;
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

    /// Attaches the adapters to `model`; every adapter tensor must find its module. A
    /// sequence-classification adapter (a trained `score` head) turns a causal LM into a
    /// classifier first, as PEFT loads it onto `AutoModelForSequenceClassification`. Returns how
    /// many projections got one.
    pub fn attach<B: Kernels>(&self, model: &mut Decoder<B>) -> Result<usize, PeftError> {
        self.attach_as(model, false)
    }

    fn attach_as<B: Kernels>(&self, model: &mut Decoder<B>, reference: bool) -> Result<usize, PeftError> {
        let device = model.device();
        if let Some(shape) = self.files.saved_module_shape("score").filter(|_| model.score.is_none() && !reference) {
            if shape.len() != 2 || shape[1] != model.config.hidden_size {
                let msg = format!("its score head is {shape:?}, not [labels, {}]", model.config.hidden_size);
                return Err(PeftError::Invalid { path: self.files.dir.join("adapter_model.safetensors"), msg });
            }
            model.make_sequence_classifier(shape[0], None, 0.0, 0);
        }
        let modules: Vec<String> = model.projections_mut().into_iter().map(|(name, _)| name).collect();
        self.check_targets(modules.iter().map(String::as_str))?;
        let mut n = 0;
        for (name, proj) in model.projections_mut() {
            let (d_in, d_out) = proj.dims();
            let lora = self.matrices(&name, d_in, d_out)?;
            let embedding = crate::formats::peft::is_embedding(&name);
            // An embedding is stored [vocab, hidden]: our [in, out].
            let full = match (self.config.saves(&name), embedding) {
                (false, _) => None,
                (true, false) => self.files.saved_module(&name, d_in, d_out)?.map(|w| Full::from_peft(&w, d_in, d_out, &device)),
                (true, true) => self.files.saved_module(&name, d_out, d_in)?.map(|w| Full::from_rows(&w, d_in, d_out, &device)),
            };
            let adapter = match (lora, full) {
                (Some(_), Some(_)) => {
                    let msg = format!("{name} has both LoRA matrices and a saved copy (modules_to_save)");
                    return Err(PeftError::Invalid { path: self.files.dir.clone(), msg });
                }
                (Some((a, b)), None) => {
                    let lora = Lora::from_peft(&a, &b, self.config.rank_for(&name), d_in, d_out, self.config.scale_for(&name), &device);
                    if self.config.use_dora && crate::formats::peft::is_embedding(&name) {
                        return Err(PeftError::Unsupported { path: self.files.dir.join("adapter_config.json"), what: "DoRA on embed_tokens".into() });
                    }
                    if crate::formats::peft::is_embedding(&name) {
                        // PEFT saves the base embedding beside an embedding LoRA; it is the base's.
                        self.files.tensors.skip(&crate::formats::peft::saved_embedding_name(&name));
                    }
                    match (self.config.use_dora && !crate::formats::peft::is_embedding(&name), self.files.magnitude(&name, d_out)?) {
                        (true, Some(m)) => Adapter::Dora(Dora::new(lora, &m, &device)),
                        (true, None) => {
                            let msg = format!("use_dora is set but {name} has no lora_magnitude_vector");
                            return Err(PeftError::Invalid { path: self.files.dir.clone(), msg });
                        }
                        (false, _) => Adapter::Lora(lora),
                    }
                }
                (None, Some(f)) => Adapter::Full(f),
                (None, None) => continue,
            };
            if reference {
                proj.reference = Some(adapter.frozen());
            } else {
                proj.adapter = Some(adapter);
            }
            n += 1;
        }
        if self.config.ensure_weight_tying && model.config.tie_word_embeddings {
            // PEFT saves the tied head's copy too; it is the embeddings' copy.
            self.files.tensors.skip(&peft::saved_module_name("lm_head"));
            model.tie_head_to_adapted_embeddings = true;
        }
        if reference {
            return Ok(n);
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
    /// Takes back a PiSSA run's adapter saved converted (`A' = [A; A₀]`, `B' = [B, −B₀]`) onto a
    /// model whose adapters were just PiSSA-initialised (the same residual base and `(A₀, B₀)`):
    /// each adapter's A and B become the first r rows and columns. Returns how many.
    pub fn restore_pissa<B: Kernels>(&self, model: &mut Decoder<B>) -> Result<usize, PeftError> {
        let device = model.device();
        let mut n = 0;
        for (name, proj) in model.projections_mut() {
            let (d_in, d_out) = proj.dims();
            let Some(Adapter::Lora(l)) = &mut proj.adapter else { continue };
            if l.initial.is_none() {
                continue;
            }
            let r = l.rank();
            let Some((a2, b2)) = self.matrices(&name, d_in, d_out)? else {
                return Err(PeftError::Invalid { path: self.files.dir.clone(), msg: format!("no adapter for {name}, which the PiSSA run adapted") });
            };
            if a2.len() != 2 * r * d_in {
                return Err(PeftError::Invalid { path: self.files.dir.clone(), msg: format!("{name}: not a converted PiSSA adapter of rank {r}") });
            }
            let a = a2[..r * d_in].to_vec();
            let b: Vec<f32> = (0..d_out).flat_map(|o| b2[o * 2 * r..o * 2 * r + r].to_vec()).collect();
            let fresh = Lora::from_peft(&a, &b, r, d_in, d_out, l.scale, &device);
            l.a = fresh.a;
            l.b = fresh.b;
            n += 1;
        }
        self.files.tensors.check_all_used().map_err(|e| PeftError::Invalid { path: self.files.dir.clone(), msg: format!("the adapter does not fit this model: {e}") })?;
        Ok(n)
    }

    /// Puts this adapter on `model` as the frozen reference (`Projection::reference`): DPO's
    /// reference when training continues from this adapter, as TRL's frozen "ref" adapter.
    /// Returns how many projections got one.
    pub fn attach_reference<B: Kernels>(&self, model: &mut Decoder<B>) -> Result<usize, PeftError> {
        self.attach_as(model, true)
    }
}

/// Expert adapters by (stack, param): (expert, matrices, rank, out).
type ExpertStacks = std::collections::BTreeMap<(String, String), Vec<(usize, LoraMatrices, usize, usize)>>;

/// Writes `model`'s adapters as a PEFT adapter directory (`adapter_config.json` with PEFT's keys,
/// `adapter_model.safetensors` in f32 with `{"format": "pt"}`), atomically. An adapter trained on
/// an NF4 base says so in a marker file, so that `ft merge` merges into the same weights.
pub fn save<B: Kernels>(model: &mut Decoder<B>, config: &LoraConfig, base_model: &str, out: &Path) -> Result<(), PeftError> {
    let mut tensors: RawTensors = Vec::new();
    let mut short: Vec<String> = Vec::new();
    let mut nf4_base = false;
    let mut saved: Vec<String> = Vec::new();
    let mut dora = false;
    let mut converted = false;
    let classifier = model.score.is_some();
    let tied_head = model.tie_head_to_adapted_embeddings;
    // Expert adapters, gathered per stack to be written as PEFT's stacked `target_parameters`.
    let mut stacks: ExpertStacks = Default::default();
    let mut target_parameters: Vec<String> = Vec::new();
    for (name, proj) in model.projections_mut() {
        nf4_base |= proj.base.is_nf4();
        let (d_in, d_out) = proj.dims();
        if let Some((stack, e, param)) = peft::expert_projection(&name) {
            match &proj.adapter {
                None => continue,
                Some(Adapter::Lora(l)) if l.initial.is_none() => {
                    stacks.entry((stack.to_string(), param.to_string())).or_default().push((e, l.to_peft(), l.rank(), d_out));
                    let t = format!("mlp.experts.{param}");
                    if !target_parameters.contains(&t) {
                        target_parameters.push(t);
                    }
                    continue;
                }
                Some(_) => return Err(PeftError::Unsupported { path: out.into(), what: format!("{name}: an expert adapter other than plain LoRA (PEFT's target_parameters)") }),
            }
        }
        if name.ends_with(".mlp.gate") && proj.adapter.is_some() {
            // The router: PEFT's `target_parameters` "mlp.gate.weight", keys as a module's.
            if !target_parameters.iter().any(|t| t == "mlp.gate.weight") {
                target_parameters.push("mlp.gate.weight".into());
            }
            if let Some(l) = proj.adapter.as_ref().and_then(Adapter::lora) {
                let (a, b) = l.to_peft();
                let (an, bn) = peft::tensor_names(&name);
                tensors.push((an, safetensors::Dtype::F32, vec![l.rank(), d_in], bytemuck::cast_slice(&a).to_vec()));
                tensors.push((bn, safetensors::Dtype::F32, vec![d_out, l.rank()], bytemuck::cast_slice(&b).to_vec()));
            }
            continue;
        }
        if let Some(Adapter::Full(f)) = &proj.adapter {
            let (shape, w) = if peft::is_embedding(&name) { (vec![d_in, d_out], f.to_rows()) } else { (vec![d_out, d_in], f.to_peft()) };
            if peft::is_embedding(&name) && tied_head {
                // PEFT (ensure_weight_tying) saves the tied head as well: the same matrix.
                tensors.push((peft::saved_module_name("lm_head"), safetensors::Dtype::F32, shape.clone(), bytemuck::cast_slice(&w).to_vec()));
            }
            tensors.push((peft::saved_module_name(&name), safetensors::Dtype::F32, shape, bytemuck::cast_slice(&w).to_vec()));
            saved.push(name);
            continue;
        }
        let Some(l) = proj.adapter.as_ref().and_then(Adapter::lora) else { continue };
        if let Some((a0, b0)) = &l.initial {
            // PiSSA, saved converted for the original base: A' = [A; A₀], B' = [B, −B₀].
            let (a, b) = l.to_peft();
            let r = l.rank();
            let (a2, b2) = super::pissa::convert(&a, &b, a0, b0, d_out, r);
            let (an, bn) = peft::tensor_names(&name);
            tensors.push((an, safetensors::Dtype::F32, vec![2 * r, d_in], bytemuck::cast_slice(&a2).to_vec()));
            tensors.push((bn, safetensors::Dtype::F32, vec![d_out, 2 * r], bytemuck::cast_slice(&b2).to_vec()));
            converted = true;
            let s = name.rsplit('.').next().unwrap_or(&name).to_string();
            if !short.contains(&s) {
                short.push(s);
            }
            continue;
        }
        if let Some(Adapter::Dora(d)) = &proj.adapter {
            tensors.push((peft::magnitude_name(&name), safetensors::Dtype::F32, vec![d_out], bytemuck::cast_slice(&d.magnitude_peft()).to_vec()));
            dora = true;
        }
        let (a, b) = l.to_peft();
        let (an, bn) = peft::tensor_names(&name);
        tensors.push((an, safetensors::Dtype::F32, vec![l.rank(), d_in], bytemuck::cast_slice(&a).to_vec()));
        tensors.push((bn, safetensors::Dtype::F32, vec![d_out, l.rank()], bytemuck::cast_slice(&b).to_vec()));
        let s = name.rsplit('.').next().unwrap_or(&name).to_string();
        if !short.contains(&s) {
            short.push(s);
        }
    }
    // PEFT's order: the stacks' gate_up before down (the first listed is wrapped innermost).
    target_parameters.sort_by_key(|t| match t.as_str() {
        "mlp.experts.gate_up_proj" => 0,
        "mlp.experts.down_proj" => 1,
        _ => 2,
    });
    for ((stack, param), mut experts) in stacks {
        experts.sort_by_key(|x| x.0);
        let (r, d_out) = (experts[0].2, experts[0].3);
        if experts.iter().enumerate().any(|(i, x)| x.0 != i || x.2 != r) {
            let msg = format!("{stack}.{param}: PEFT stores an expert stack whole, but only some experts (or experts of different ranks) have adapters");
            return Err(PeftError::Invalid { path: out.into(), msg });
        }
        let mats: Vec<LoraMatrices> = experts.into_iter().map(|x| x.1).collect();
        let n = mats.len();
        let d_in = mats[0].0.len() / r;
        let (a, b) = peft::stack(&mats, r, d_out);
        let (an, bn) = peft::stack_tensor_names(&stack, &param, &target_parameters);
        tensors.push((an, safetensors::Dtype::F32, vec![n * r, d_in], bytemuck::cast_slice(&a).to_vec()));
        tensors.push((bn, safetensors::Dtype::F32, vec![d_out, r * n], bytemuck::cast_slice(&b).to_vec()));
    }
    if tensors.is_empty() {
        return Err(PeftError::Invalid { path: out.into(), msg: "the model has no adapters to save".into() });
    }
    // PEFT writes the modules_to_save it was given; for SEQ_CLS it adds "classifier" and "score".
    let mut modules_to_save = config.modules_to_save.clone();
    for s in saved {
        if !config.saves(&s) {
            modules_to_save.push(s);
        }
    }
    // A converted PiSSA adapter has twice the rank at the same scale.
    let (r, alpha, rank_pattern, alpha_pattern) = if converted {
        let k = if config.use_rslora { std::f64::consts::SQRT_2 } else { 2.0 };
        (2 * config.r, k * config.alpha, config.rank_pattern.iter().map(|(p, r)| (p.clone(), 2 * r)).collect::<Vec<_>>(), config.alpha_pattern.iter().map(|(p, a)| (p.clone(), k * a)).collect::<Vec<_>>())
    } else {
        (config.r, config.alpha, config.rank_pattern.clone(), config.alpha_pattern.clone())
    };
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": if classifier { "SEQ_CLS" } else { "CAUSAL_LM" },
        "base_model_name_or_path": base_model,
        "r": r,
        "rank_pattern": rank_pattern.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        "alpha_pattern": alpha_pattern.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        // A regex is written as given; names as the adapted modules' short names (PEFT applies
        // exclude_modules and layers_to_transform on top).
        "target_modules": match &config.targets {
            super::config::Targets::Regex(re) => serde_json::Value::from(re.clone()),
            _ => serde_json::Value::from(short),
        },
        "exclude_modules": match &config.exclude {
            Some(super::config::Targets::Regex(re)) => serde_json::Value::from(re.clone()),
            Some(super::config::Targets::Names(n)) => serde_json::Value::from(n.clone()),
            _ => serde_json::Value::Null,
        },
        "target_parameters": if target_parameters.is_empty() { serde_json::Value::Null } else { target_parameters.into() },
        "ensure_weight_tying": config.ensure_weight_tying,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": config.init.peft_value(),
        "inference_mode": true,
        "modules_to_save": if modules_to_save.is_empty() { serde_json::Value::Null } else { modules_to_save.into() },
        "use_dora": dora,
        "layers_to_transform": config.layers.clone(),
        "layers_pattern": null,
        "revision": null,
    });
    let base = nf4_base.then(|| serde_json::json!({"quantization": "nf4", "blocksize": crate::quant::nf4::BLOCKSIZE, "double_quant": true}));
    peft::write(out, &tensors, &cfg, base.as_ref())
}

/// A PiSSA / OLoRA run saved as PEFT saves it without `path_initial_model_for_weight_conversion`:
/// the adapter at rank r (`adapter_out`), relative to the residual base, which is written beside
/// it as a model directory (`residual_out`: every tensor of `base_dir` in f32, each adapted
/// linear weight replaced by its residual `W − s·B₀A₀`, config `dtype` float32 so that
/// transformers keeps the residual's precision). Loading `residual_out` with the adapter gives
/// the trained model. A 4-bit stored base is refused (its residual has no 4-bit file form here).
pub fn save_pissa_residual<B: Kernels>(model: &mut Decoder<B>, config: &LoraConfig, base_dir: &Path, adapter_out: &Path, residual_out: &Path) -> Result<(), PeftError> {
    use crate::formats::model_dir::ModelDirWriter;
    use crate::formats::safetensors::{to_f32, TensorFiles};
    let invalid = |msg: String| PeftError::Invalid { path: residual_out.into(), msg };
    let ck = TensorFiles::open(base_dir)?;
    if ck.names().any(|n| n.ends_with(crate::formats::bnb::STATE_SUFFIX)) {
        return Err(invalid(format!("{} is a 4-bit checkpoint: the residual base is written in f32 from a dense base only (save converted instead)", base_dir.display())));
    }
    // The residuals, and the adapters without their initial parts for a plain save.
    let mut residuals: HashMap<String, Vec<f32>> = HashMap::new();
    let mut initials = Vec::new();
    for (name, proj) in model.projections_mut() {
        if proj.lora().is_some_and(|l| l.initial.is_some()) {
            residuals.insert(format!("{name}.weight"), proj.base_weight_peft());
            let l = proj.adapter.as_mut().and_then(Adapter::lora_mut).expect("checked");
            initials.push((name, l.initial.take()));
        }
    }
    let restore = |model: &mut Decoder<B>, initials: Vec<(String, Option<LoraMatrices>)>| {
        let mut by_name: HashMap<String, Option<LoraMatrices>> = initials.into_iter().collect();
        for (name, proj) in model.projections_mut() {
            if let (Some(init), Some(l)) = (by_name.remove(&name), proj.adapter.as_mut().and_then(Adapter::lora_mut)) {
                l.initial = init;
            }
        }
    };
    let saved = save(model, config, &residual_out.display().to_string(), adapter_out);
    restore(model, initials);
    saved?;
    let mut writer = ModelDirWriter::new(residual_out).map_err(|e| invalid(e.to_string()))?;
    for (i, file) in ck.files().into_iter().enumerate() {
        let mut tensors: RawTensors = Vec::new();
        for name in ck.shard_names(i) {
            let (bytes, dtype, shape, _) = ck.raw(&name)?;
            let w = match residuals.remove(&name) {
                Some(w) => w,
                None => to_f32(bytes, dtype).ok_or_else(|| invalid(format!("{name}: {dtype:?} is not a float tensor")))?,
            };
            tensors.push((name, safetensors::Dtype::F32, shape, bytemuck::cast_slice(&w).to_vec()));
        }
        writer.write_shard(&file.file_name().expect("file").to_string_lossy(), &tensors, ck.shard_metadata(i)).map_err(|e| invalid(e.to_string()))?;
    }
    if let Some(left) = residuals.keys().next() {
        return Err(invalid(format!("{left} is not in {}", base_dir.display())));
    }
    writer
        .copy_sidecars(base_dir, |cfg| {
            for key in ["torch_dtype", "dtype"] {
                if cfg.get(key).is_some() {
                    cfg[key] = "float32".into();
                }
            }
            true
        })
        .map_err(|e| invalid(e.to_string()))?;
    writer.commit().map_err(|e| invalid(e.to_string()))?;
    Ok(())
}
