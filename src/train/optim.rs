//! AdamW with PyTorch's semantics (decoupled weight decay `p ← p·(1 − lr·wd)`, bias-corrected
//! moments, `eps` added to the corrected second-moment root; betas 0.9/0.999, eps 1e-8), global
//! gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`, and HF's learning-rate schedules.

use crate::ops::SumAll;
use burn::prelude::*;

/// The learning-rate schedule after warmup (transformers' `lr_scheduler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// The parameters (or their gradients, or moments) as one flat vector: each tensor row-major,
/// one after the other. The optimizer works on this, so a step is a dozen tensor operations
/// whatever the number of adapted projections (hundreds; on the GPU each operation is a kernel
/// launch).
pub fn flatten<B: Backend>(ts: &[Tensor<B, 2>]) -> Tensor<B, 1> {
    assert!(!ts.is_empty(), "no trainable parameters");
    Tensor::cat(ts.iter().map(|t| t.clone().reshape([t.shape().num_elements()])).collect(), 0)
}

/// The tensors of `shapes` that [`flatten`] laid out in `flat` (views of it).
pub fn unflatten<B: Backend>(flat: Tensor<B, 1>, shapes: &[[usize; 2]]) -> Vec<Tensor<B, 2>> {
    let mut at = 0;
    shapes
        .iter()
        .map(|&[r, c]| {
            let t = flat.clone().narrow(0, at, r * c).reshape([r, c]);
            at += r * c;
            t
        })
        .collect()
}

/// AdamW state over a list of parameters, kept flat (see [`flatten`]).
pub struct AdamW<B: Backend> {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken.
    pub t: usize,
    shapes: Vec<[usize; 2]>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(params: &[Tensor<B, 2>], weight_decay: f64) -> Self {
        let zeros = flatten(params).zeros_like();
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            shapes: params.iter().map(|p| p.dims()).collect(),
            m: zeros.clone(),
            v: zeros,
        }
    }

    /// The parameters' shapes, in order.
    pub fn shapes(&self) -> &[[usize; 2]] {
        &self.shapes
    }

    /// First and second moments, per parameter (for checkpoints).
    pub fn moments(&self) -> (Vec<Tensor<B, 2>>, Vec<Tensor<B, 2>>) {
        (unflatten(self.m.clone(), &self.shapes), unflatten(self.v.clone(), &self.shapes))
    }

    /// Restores moments and the step count saved by a checkpoint.
    pub fn restore(&mut self, m: Vec<Tensor<B, 2>>, v: Vec<Tensor<B, 2>>, t: usize) {
        self.m = flatten(&m);
        self.v = flatten(&v);
        self.t = t;
    }

    /// One update of the flat parameters given their flat gradients; returns the new ones.
    pub fn step_flat(&mut self, p: Tensor<B, 1>, g: Tensor<B, 1>, lr: f64) -> Tensor<B, 1> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        let m = self.m.clone() * self.beta1 + g.clone() * (1.0 - self.beta1);
        let v = self.v.clone() * self.beta2 + g.clone() * g * (1.0 - self.beta2);
        let p = if self.weight_decay != 0.0 { p * (1.0 - lr * self.weight_decay) } else { p };
        let denom = v.clone().sqrt() / bc2_sqrt + self.eps;
        let new = p - m.clone() / denom * step_size;
        self.m = m;
        self.v = v;
        new
    }
}

/// Global L2 norm of the (flat) gradients; scales them to `max_norm` when above it (PyTorch:
/// `coef = max_norm / (norm + 1e-6)`, applied when `coef < 1`). Returns the norm before clipping.
pub fn clip_global_norm<B: Backend>(grads: &mut Tensor<B, 1>, max_norm: f64) -> f64 {
    let norm = crate::loss::scalar(grads.clone().powi_scalar(2).sum_all()).sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            *grads = grads.clone() * coef;
        }
    }
    norm
}

/// Learning rate at optimizer step `step` (0-based) of `total`, as transformers' schedulers.
pub fn learning_rate(base: f64, schedule: Schedule, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    /// One update of per-tensor parameters (the loop updates the flat vector directly).
    fn step<B: Backend>(opt: &mut AdamW<B>, params: Vec<Tensor<B, 2>>, grads: Vec<Tensor<B, 2>>, lr: f64) -> Vec<Tensor<B, 2>> {
        let new = opt.step_flat(flatten(&params), flatten(&grads), lr);
        unflatten(new, opt.shapes())
    }
    use burn::tensor::TensorData;

    #[test]
    fn adamw_matches_pytorch_first_steps() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01), p = [1, -2], grads [0.5, 0.5] then [-1, 2]:
        // step 1: p·(1−0.001) − 0.1·sign(g) → [0.899, -2.098]
        let d = Default::default();
        let p = vec![Tensor::<Cpu, 2>::from_data(TensorData::new(vec![1.0f32, -2.0], [1, 2]), &d)];
        let mut opt = AdamW::new(&p, 0.01);
        let g = vec![Tensor::<Cpu, 2>::from_data(TensorData::new(vec![0.5f32, 0.5], [1, 2]), &d)];
        let p = step(&mut opt, p, g, 0.1);
        let v: Vec<f32> = p[0].to_data().to_vec().unwrap();
        assert!((v[0] - 0.899).abs() < 1e-6 && (v[1] + 2.098).abs() < 1e-6, "{v:?}");
        // step 2 by hand: m = 0.9·m + 0.1·g, v = 0.999·v + 0.001·g², p·(1−0.001) − 0.1/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)
        let g2 = [-1.0f64, 2.0];
        let mut want = [0.0f64; 2];
        for i in 0..2 {
            let m = 0.9 * 0.05 + 0.1 * g2[i];
            let vv = 0.999 * 0.00025 + 0.001 * g2[i] * g2[i];
            let (bc1, bc2) = (1.0 - 0.81, 1.0 - 0.999f64.powi(2));
            let p0 = [0.899f64, -2.098][i] * (1.0 - 0.001);
            want[i] = p0 - 0.1 / bc1 * m / (vv.sqrt() / bc2.sqrt() + 1e-8);
        }
        let g = vec![Tensor::<Cpu, 2>::from_data(TensorData::new(vec![-1.0f32, 2.0], [1, 2]), &d)];
        let v: Vec<f32> = step(&mut opt, p, g, 0.1)[0].to_data().to_vec().unwrap();
        assert!((v[0] as f64 - want[0]).abs() < 1e-5 && (v[1] as f64 - want[1]).abs() < 1e-5, "{v:?} vs {want:?}");
    }

    #[test]
    fn clipping_uses_the_global_norm() {
        let d = Default::default();
        let g = vec![
            Tensor::<Cpu, 2>::from_data(TensorData::new(vec![3.0f32], [1, 1]), &d),
            Tensor::<Cpu, 2>::from_data(TensorData::new(vec![4.0f32], [1, 1]), &d),
        ];
        let mut flat = flatten(&g);
        let n = clip_global_norm(&mut flat, 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        let a: f32 = unflatten(flat, &[[1, 1], [1, 1]])[0].clone().into_scalar();
        assert!((a - 3.0 / (5.0 + 1e-6) as f32).abs() < 1e-6);
    }

    #[test]
    fn flat_parameters_round_trip_in_order() {
        let d = Default::default();
        let a = Tensor::<Cpu, 2>::from_data(TensorData::new((0..6).map(|i| i as f32).collect::<Vec<_>>(), [2, 3]), &d);
        let b = Tensor::<Cpu, 2>::from_data(TensorData::new(vec![10f32, 11.0], [2, 1]), &d);
        let flat = flatten(&[a.clone(), b.clone()]);
        assert_eq!(flat.to_data().to_vec::<f32>().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 11.0]);
        let back = unflatten(flat, &[[2, 3], [2, 1]]);
        assert_eq!(back[0].to_data(), a.to_data());
        assert_eq!(back[1].to_data(), b.to_data());
    }

    #[test]
    fn schedules_match_transformers() {
        assert_eq!(learning_rate(1.0, Schedule::Linear, 0, 10, 0), 1.0);
        assert!((learning_rate(1.0, Schedule::Linear, 5, 10, 0) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Schedule::Linear, 1, 10, 2) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Schedule::Cosine, 5, 10, 0) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, Schedule::Constant, 7, 10, 0), 1.0);
    }
}
