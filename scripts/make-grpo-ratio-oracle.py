#!/usr/bin/env python3
"""GRPO with a reused generation (num_iterations > 1): the loss, TRL's clip_ratio metrics and the
gradient with respect to each token's log-prob, for the oracle completions of
tests/fixtures/grpo/expected.json with made-up "old" (sampling-policy) log-probs.

TRL 1.16's GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py, loss types grpo/bnpo/dr_grpo/
dapo, importance_sampling_level "token", delta None, use_bias_correction_kl True) transcribed line
by line in float64 numpy: torch is not installable on this machine. The gradient of
-min(coef_1*A, clamp(coef_1)*A) follows torch's rules: min passes the gradient to the smaller
operand, clamp passes it only inside [1-eps, 1+eps_high] (inclusive); the old log-probs are
constants.

    python3 scripts/make-grpo-ratio-oracle.py > tests/fixtures/grpo/ratio.json
"""
import json
import math
import pathlib

import numpy as np

here = pathlib.Path(__file__).resolve().parent.parent
o = json.loads((here / "tests/fixtures/grpo/expected.json").read_text())
eps_low, eps_high = o["epsilon"], o["epsilon_high"]
max_len = o["max_completion_length"]
policy = o["per_token_logps"]["policy"]
reference = o["per_token_logps"]["reference"]
adv = np.array(o["advantages"]["group"])
# Old log-probs: the policy's shifted by up to ±0.45, so that ratios fall on both sides of the
# clipping range for completions with positive and negative advantages.
old = [[lp + 0.45 * math.sin(1.7 * i + 0.9 * t + 0.3) for t, lp in enumerate(row)] for i, row in enumerate(policy)]

n = len(policy)
T = max(len(r) for r in policy)
def pad(rows):
    a = np.zeros((n, T))
    for i, r in enumerate(rows):
        a[i, : len(r)] = r
    return a
lp, ref, old_lp = pad(policy), pad(reference), pad(old)
mask = pad([[1.0] * len(r) for r in policy])
A = adv[:, None]

out = {"source": "scripts/make-grpo-ratio-oracle.py (TRL 1.16 _compute_loss transcribed; see its docstring)",
       "epsilon": eps_low, "epsilon_high": eps_high, "old_per_token_logps": old, "loss": {}, "grad_logps": {}, "metrics": {}}
for beta in (0.0, 0.04):
    log_ratio = lp - old_lp
    coef_1 = np.exp(log_ratio)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    kl = np.exp(ref - lp) - (ref - lp) - 1
    kl_b = kl * coef_1  # use_bias_correction_kl
    l1, l2 = coef_1 * A, coef_2 * A
    per_token = -np.minimum(l1, l2)
    if beta != 0.0:
        per_token = per_token + beta * kl_b
    # d per_token / d lp
    take1 = l1 <= l2  # torch.min: ties split, but at a tie coef_2 == coef_1 inside the range
    inside = (coef_1 >= 1 - eps_low) & (coef_1 <= 1 + eps_high)
    d1 = coef_1 * A
    d2 = np.where(inside, coef_1, 0.0) * A
    d = -np.where(take1, d1, d2)
    if beta != 0.0:
        # d(kl * coef_1)/dlp = (-(e^(ref-lp)) + 1) * coef_1 + kl * coef_1
        d = d + beta * ((1 - np.exp(ref - lp)) * coef_1 + kl * coef_1)
    tokens = mask.sum()
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        if loss_type == "grpo":
            w = mask / mask.sum(-1, keepdims=True) / n
        elif loss_type in ("bnpo", "dapo"):
            w = mask / tokens
        else:
            w = mask / (n * max_len)
        key = f"{loss_type}/beta={beta}"
        out["loss"][key] = float((per_token * w).sum())
        out["grad_logps"][key] = [list(map(float, (d * w)[i, : len(policy[i])])) for i in range(n)]
    low = ((coef_1 < 1 - eps_low) & (A < 0)).astype(float)
    high = ((coef_1 > 1 + eps_high) & (A > 0)).astype(float)
    region = np.maximum(low, high)
    gmean = lambda x: float((x * mask).sum() / mask.sum())
    seq = lambda x: (x * mask).sum(-1) / mask.sum(-1)
    m = {"clip_ratio/low_mean": gmean(low), "clip_ratio/high_mean": gmean(high), "clip_ratio/region_mean": gmean(region),
         "clip_ratio/low_min": float(np.nanmin(seq(low))), "clip_ratio/high_max": float(np.nanmax(seq(high)))}
    if beta != 0.0:
        m["kl"] = gmean(kl_b)  # TRL logs per_token_kl after the bias correction
    out["metrics"][f"beta={beta}"] = m
print(json.dumps(out, indent=1))
