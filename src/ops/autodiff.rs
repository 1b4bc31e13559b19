//! The fused operations under autodiff: each is one graph node whose backward step calls the
//! inner backend's backward kernel. Only the inputs that carry gradients are parents (RMSNorm's
//! weight is frozen: it gets no gradient).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{Bool, TensorPrimitive};

use super::{FusedOps, Nf4Linear, Scores};
use crate::quant::nf4_weight::Nf4Weight;

/// A backward node exists only where the inner backend ran the forward kernel, and a backend with
/// a forward kernel has its backward one.
const PAIRED: &str = "a backend with a forward kernel has the backward kernel";

fn inner<B: FusedOps, C: CheckpointStrategy, const D: usize>(t: &Tensor<Autodiff<B, C>, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t.clone().into_primitive().tensor().primitive))
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: FusedOps> Backward<B, 1> for RmsNormBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, eps) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, prim(B::rms_norm_backward(float(x), float(w), eps, float(grad)).expect(PAIRED)));
        }
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: FusedOps> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin, transpose) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            // The map is linear in x: its backward is its transpose.
            grads.register::<B>(node.id, prim(B::rope_fused(float(grad), float(cos), float(sin), !transpose).expect(PAIRED)));
        }
    }
}

#[derive(Debug)]
struct SwigluBackward {
    /// GeGLU (`gelu_tanh(gate) · up`) instead of SwiGLU.
    gelu: bool,
}

impl<B: FusedOps> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (dg, du) = if self.gelu {
            B::geglu_backward(float(gate), float(up), float(grad))
        } else {
            B::swiglu_backward(float(gate), float(up), float(grad))
        }
        .expect(PAIRED);
        let [g, u] = ops.parents;
        if let Some(node) = g {
            grads.register::<B>(node.id, prim(dg));
        }
        if let Some(node) = u {
            grads.register::<B>(node.id, prim(du));
        }
    }
}

#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    x: FloatTensor<B>,
    x_lora: Option<FloatTensor<B>>,
    w: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    t: FloatTensor<B>,
    scale: f64,
}

impl<B: FusedOps> LoraState<B> {
    /// Gradients for (x, x', A, B).
    fn backward(self, grad: FloatTensor<B>) -> [Option<FloatTensor<B>>; 4] {
        let (dx, dxl, da, db) =
            B::lora_linear_backward(float(self.x), self.x_lora.map(float), float(self.w), float(self.a), float(self.b), float(self.t), self.scale, float(grad))
                .expect(PAIRED);
        [Some(prim(dx)), dxl.map(prim), Some(prim(da)), Some(prim(db))]
    }
}

/// Parents (x, A, B): the adapter reads `x` itself.
#[derive(Debug)]
struct LoraLinearBackward;

impl<B: FusedOps> Backward<B, 3> for LoraLinearBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dx, _, da, db] = ops.state.backward(grad);
        for (node, g) in ops.parents.into_iter().zip([dx, da, db]) {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// Parents (x, x', A, B): the adapter reads `x'` (after dropout).
#[derive(Debug)]
struct LoraDropoutLinearBackward;

impl<B: FusedOps> Backward<B, 4> for LoraDropoutLinearBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        for (node, g) in ops.parents.into_iter().zip(ops.state.backward(grad)) {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug, Clone)]
struct AttentionState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    o: FloatTensor<B>,
    lse: FloatTensor<B>,
    mask: BoolTensor<B>,
    scores: Scores,
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: FusedOps> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let mask = Tensor::<B, 3, Bool>::from_primitive(s.mask);
        let (dq, dk, dv) = B::attention_backward(float(s.q), float(s.k), float(s.v), float(s.o), float(s.lse), mask, s.scores, float(grad)).expect(PAIRED);
        for (node, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, prim(g));
            }
        }
    }
}

#[derive(Debug)]
struct TokenLogprobsBackward;

impl<B: FusedOps> Backward<B, 1> for TokenLogprobsBackward {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets, lse) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            let d = B::token_logprobs_backward(float(logits), Tensor::from_primitive(targets), float(lse), float(grad)).expect(PAIRED);
            grads.register::<B>(node.id, prim(d));
        }
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn rms_norm_fused(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Option<Tensor<Self, 2>> {
        let (xi, wi) = (inner(&x), inner(&w));
        let node = x.into_primitive().tensor().node;
        let out = prim(B::rms_norm_fused(xi.clone(), wi.clone(), eps)?);
        let out = match RmsNormBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((prim(xi), prim(wi), eps), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Some(float(out))
    }

    fn rope_fused(x: Tensor<Self, 4>, cos: Tensor<Self, 3>, sin: Tensor<Self, 3>, transpose: bool) -> Option<Tensor<Self, 4>> {
        let (xi, ci, si) = (inner(&x), inner(&cos), inner(&sin));
        let node = x.into_primitive().tensor().node;
        let out = prim(B::rope_fused(xi, ci.clone(), si.clone(), transpose)?);
        let out = match RopeBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((prim(ci), prim(si), transpose), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Some(float(out))
    }

    fn swiglu_fused(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        let (gi, ui) = (inner(&gate), inner(&up));
        let nodes = [gate.into_primitive().tensor().node, up.into_primitive().tensor().node];
        let out = prim(B::swiglu_fused(gi.clone(), ui.clone())?);
        let out = match (SwigluBackward { gelu: false }).prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((prim(gi), prim(ui)), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Some(float(out))
    }

    fn geglu_fused(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        let (gi, ui) = (inner(&gate), inner(&up));
        let nodes = [gate.into_primitive().tensor().node, up.into_primitive().tensor().node];
        let out = prim(B::geglu_fused(gi.clone(), ui.clone())?);
        let out = match (SwigluBackward { gelu: true }).prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((prim(gi), prim(ui)), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Some(float(out))
    }

    fn lora_linear_fused(
        x: Tensor<Self, 2>,
        x_lora: Option<Tensor<Self, 2>>,
        w: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        let (xi, xli, wi, ai, bi) = (inner(&x), x_lora.as_ref().map(inner), inner(&w), inner(&a), inner(&b));
        let (y, t) = B::lora_linear_fused(xi.clone(), xli.clone(), wi.clone(), ai.clone(), bi.clone(), scale)?;
        let state = |t: Tensor<B, 2>| LoraState { x: prim(xi), x_lora: xli.map(prim), w: prim(wi), a: prim(ai), b: prim(bi), t: prim(t), scale };
        let node = |t: &Tensor<Self, 2>| t.clone().into_primitive().tensor().node;
        let out = match &x_lora {
            None => match LoraLinearBackward.prepare::<C>([node(&x), node(&a), node(&b)]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(state(t.clone()), prim(y)),
                OpsKind::UnTracked(prep) => prep.finish(prim(y)),
            },
            Some(xl) => match LoraDropoutLinearBackward.prepare::<C>([node(&x), node(xl), node(&a), node(&b)]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(state(t.clone()), prim(y)),
                OpsKind::UnTracked(prep) => prep.finish(prim(y)),
            },
        };
        Some((float(out), Tensor::from_inner(t)))
    }

    fn token_logprobs_fused(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> Option<(Tensor<Self, 1>, Tensor<Self, 1>)> {
        let li = inner(&logits);
        let ti = Tensor::<B, 1, Int>::from_primitive(targets.into_primitive());
        let node = logits.into_primitive().tensor().node;
        let (logp, lse) = B::token_logprobs_fused(li.clone(), ti.clone())?;
        let out = match TokenLogprobsBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((prim(li), ti.into_primitive(), prim(lse.clone())), prim(logp)),
            OpsKind::UnTracked(prep) => prep.finish(prim(logp)),
        };
        Some((float(out), Tensor::from_inner(lse)))
    }

    fn attention_fused(q: Tensor<Self, 4>, k: Tensor<Self, 4>, v: Tensor<Self, 4>, mask: Tensor<Self, 3, Bool>, s: Scores) -> Option<(Tensor<Self, 4>, Tensor<Self, 3>)> {
        attention_node(q, k, v, mask, s)
    }
}

/// The inner backend's fused attention (softcapped, windowed or plain) as one autodiff node.
#[allow(clippy::type_complexity)]
fn attention_node<B: FusedOps, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 4>,
    k: Tensor<Autodiff<B, C>, 4>,
    v: Tensor<Autodiff<B, C>, 4>,
    mask: Tensor<Autodiff<B, C>, 3, Bool>,
    scores: Scores,
) -> Option<(Tensor<Autodiff<B, C>, 4>, Tensor<Autodiff<B, C>, 3>)> {
    let (qi, ki, vi) = (inner(&q), inner(&k), inner(&v));
    let mask = Tensor::<B, 3, Bool>::from_primitive(mask.into_primitive());
    let nodes = [q.into_primitive().tensor().node, k.into_primitive().tensor().node, v.into_primitive().tensor().node];
    let (o, lse) = B::attention_fused(qi.clone(), ki.clone(), vi.clone(), mask.clone(), scores)?;
    let out = match AttentionBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = AttentionState { q: prim(qi), k: prim(ki), v: prim(vi), o: prim(o.clone()), lse: prim(lse.clone()), mask: mask.into_primitive(), scores };
            prep.finish(state, prim(o))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(o)),
    };
    Some((float(out), Tensor::from_inner(lse)))
}

/// What the backward step needs to dequantize `W` again.
#[derive(Debug, Clone)]
struct Nf4BackwardState<B: Backend> {
    words: IntTensor<B>,
    absmax: FloatTensor<B>,
    code: FloatTensor<B>,
    rows: usize,
    cols: usize,
    blocksize: usize,
}

impl<B: Backend> Nf4BackwardState<B> {
    fn weight(&self) -> Nf4Weight<B> {
        Nf4Weight::from_parts(
            Tensor::from_primitive(self.words.clone()),
            Tensor::from_primitive(TensorPrimitive::Float(self.absmax.clone())),
            Tensor::from_primitive(TensorPrimitive::Float(self.code.clone())),
            self.rows,
            self.cols,
            self.blocksize,
        )
    }
}

#[derive(Debug)]
struct Nf4LinearBackward;

impl<B: Nf4Linear> Backward<B, 1> for Nf4LinearBackward {
    type State = Nf4BackwardState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let packed = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // d(x · Wᵀ)/dx = grad · W, with W dequantized again here.
            let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
            let dtype = grad.dtype().into();
            grad.matmul(B::nf4_dequantize(&packed.weight(), dtype)).into_primitive().tensor()
        });
    }
}

impl<B: super::Uploads, C: CheckpointStrategy> super::Uploads for Autodiff<B, C> {
    fn release_uploads(device: &Self::Device) {
        B::release_uploads(device)
    }
}

impl<B: Nf4Linear, C: CheckpointStrategy> Nf4Linear for Autodiff<B, C> {
    fn nf4_linear(x: Tensor<Self, 2>, w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        let inner = w.inner();
        let x = x.into_primitive().tensor();
        let x_inner = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
        let out = B::nf4_linear(x_inner, &inner).into_primitive().tensor();
        let out = match Nf4LinearBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = Nf4BackwardState {
                    words: inner.words.val().into_primitive(),
                    absmax: inner.absmax.val().into_primitive().tensor(),
                    code: inner.code.val().into_primitive().tensor(),
                    rows: inner.rows,
                    cols: inner.cols,
                    blocksize: inner.blocksize,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::quant::nf4::Nf4;
    use burn::tensor::TensorData;

    type Ad = Autodiff<Cpu>;

    #[test]
    fn gradient_equals_the_dense_matmul_gradient() {
        let dev = Default::default();
        let (out, inp) = (5, 128);
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 300.0).collect();
        let q = Nf4::quantize(&w, 64, true);
        let x: Vec<f32> = (0..3 * inp).map(|i| ((i * 31 % 17) as f32 - 8.0) / 10.0).collect();
        let c: Vec<f32> = (0..3 * out).map(|i| i as f32 - 4.0).collect();
        let c = Tensor::<Ad, 2>::from_data(TensorData::new(c, [3, out]), &dev);

        let xq = Tensor::<Ad, 2>::from_data(TensorData::new(x.clone(), [3, inp]), &dev).require_grad();
        let yq = Ad::nf4_linear(xq.clone(), &Nf4Weight::new(&q, out, inp, &dev));
        let gq = (yq.clone() * c.clone()).sum().backward();
        let gq: Vec<f32> = xq.grad(&gq).unwrap().into_data().to_vec().unwrap();

        let xd = Tensor::<Ad, 2>::from_data(TensorData::new(x, [3, inp]), &dev).require_grad();
        let wd = Tensor::<Ad, 2>::from_data(TensorData::new(q.dequantize(), [out, inp]), &dev);
        let yd = xd.clone().matmul(wd.transpose());
        let gd = (yd.clone() * c).sum().backward();
        let gd: Vec<f32> = xd.grad(&gd).unwrap().into_data().to_vec().unwrap();

        let (yq, yd): (Vec<f32>, Vec<f32>) = (yq.into_data().to_vec().unwrap(), yd.into_data().to_vec().unwrap());
        assert_eq!(yq, yd);
        for (a, b) in gq.iter().zip(&gd) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
