"""Cross-checks ft's LoRA SFT against PyTorch + PEFT on the tiny llama oracle (run where torch,
transformers and peft are installed; the GPU machine has them):

    scripts/peft-crosscheck.sh            # here: runs ft, then this script (or carry .bin/peft)
    python3 scripts/peft-crosscheck.py .bin/peft

For each adapter kind ft writes (DIR/<kind>/: lora, rslora, dora, modules_to_save, embedding,
rank_pattern) reads init/ (ft's adapter after one step at learning rate 0: PEFT's init from ft's
seed), run/metrics.jsonl and run/adapter/ (20 ft steps of constant-lr AdamW on all of
chat.jsonl), and run/summary.json. Checks (1) the final ft adapter loads with
PeftModel.from_pretrained and gives the eval loss ft reported, (2) a torch.optim.AdamW loop from
the same initial adapter on the same batch reproduces ft's 20 losses (max relative difference
printed): the gradients of every kind, through PEFT's own modules.
"""
import json
import sys

import torch
import transformers
from peft import PeftModel

d = sys.argv[1]
fx = "tests/fixtures"
cases = json.load(open(f"{fx}/chat_tokens.json"))
T = max(len(c["input_ids"]) for c in cases)
ids = torch.zeros(len(cases), T, dtype=torch.long)
labels = torch.full((len(cases), T), -100, dtype=torch.long)
attn = torch.zeros(len(cases), T, dtype=torch.long)
for i, c in enumerate(cases):
    n = len(c["input_ids"])
    ids[i, :n] = torch.tensor(c["input_ids"])
    attn[i, :n] = 1
    for j, m in enumerate(c["assistant_mask"]):
        if m:
            labels[i, j] = c["input_ids"][j]
n_tokens = int((labels[:, 1:] != -100).sum())


def loss_of(model):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum") / n_tokens


def base():
    return transformers.AutoModelForCausalLM.from_pretrained(f"{fx}/models/llama", dtype=torch.float32)


KINDS = ["lora", "rslora", "dora", "modules_to_save", "modules_to_save_embed", "embedding", "rank_pattern", "regex", "targets"]
ok = True
for kind in KINDS:
    k = f"{d}/{kind}"
    summary = json.load(open(f"{k}/run/summary.json"))
    with torch.no_grad():
        final = PeftModel.from_pretrained(base(), f"{k}/run/adapter")
        peft_eval = float(loss_of(final))
    # The same 20 steps in torch: AdamW from ft's initial adapter on the same batch.
    model = PeftModel.from_pretrained(base(), f"{k}/init", is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ft_losses = [json.loads(l)["loss"] for l in open(f"{k}/run/metrics.jsonl") if '"loss"' in l]
    torch_losses = []
    for _ in range(len(ft_losses)):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch_losses.append(float(loss))
    rel = max(abs(a - b) / abs(b) for a, b in zip(ft_losses, torch_losses))
    eval_diff = abs(peft_eval - summary["eval_loss"])
    print(json.dumps({"kind": kind, "trainable_tensors": len(params), "ft_eval_loss": summary["eval_loss"], "peft_eval_loss": peft_eval,
                      "eval_abs_diff": eval_diff, "losses_max_rel_diff": rel,
                      "ft_first_last": [round(ft_losses[0], 6), round(ft_losses[-1], 6)],
                      "torch_first_last": [round(torch_losses[0], 6), round(torch_losses[-1], 6)]}))
    ok &= rel <= 1e-3 and eval_diff <= 1e-4
# The reward model: PEFT's SEQ_CLS adapter on AutoModelForSequenceClassification scores each side
# (the full ChatML render, dpo/expected.json's ids) as `ft score` did.
pairs = json.load(open(f"{fx}/dpo/expected.json"))["pairs"]
scores = [json.loads(l) for l in open(f"{d}/reward/scores.jsonl")]
with torch.no_grad():
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(f"{fx}/models/llama", num_labels=1, dtype=torch.float32)
    rm = PeftModel.from_pretrained(rm, f"{d}/reward/run/adapter")
    diff = 0.0
    for p, s in zip(pairs, scores):
        for side in ("chosen", "rejected"):
            r = float(rm(input_ids=torch.tensor([p[side]["input_ids"]])).logits[0, 0])
            diff = max(diff, abs(r - s[f"reward_{side}"]))
print(json.dumps({"kind": "reward (SEQ_CLS)", "pairs": len(scores), "rewards_max_abs_diff": diff}))
ok &= diff <= 1e-4
sys.exit(0 if ok else 1)
