"""Cross-checks ft's LoRA SFT against PyTorch + PEFT on the tiny llama oracle (run where torch,
transformers and peft are installed; the GPU machine has them):

    scripts/peft-crosscheck.sh            # here: runs ft, then this script (or carry .bin/peft)
    python3 scripts/peft-crosscheck.py .bin/peft

Reads from DIR: init/ (ft's adapter after one step at learning rate 0: PEFT init from ft's seed),
run/metrics.jsonl and run/adapter/ (20 ft steps of constant-lr AdamW on all of chat.jsonl), and
run/summary.json. Checks (1) the final ft adapter loads with PeftModel.from_pretrained and gives
the eval loss ft reported, (2) a torch.optim.AdamW loop from the same initial adapter on the same
batch reproduces ft's 20 losses (max relative difference printed).
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


summary = json.load(open(f"{d}/run/summary.json"))
with torch.no_grad():
    final = PeftModel.from_pretrained(base(), f"{d}/run/adapter")
    peft_eval = float(loss_of(final))
print(json.dumps({"check": "ft adapter in PEFT", "ft_eval_loss": summary["eval_loss"], "peft_loss": peft_eval,
                  "abs_diff": abs(peft_eval - summary["eval_loss"])}))

model = PeftModel.from_pretrained(base(), f"{d}/init", is_trainable=True)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
ft_losses = [json.loads(l)["loss"] for l in open(f"{d}/run/metrics.jsonl") if '"loss"' in l]
torch_losses = []
for _ in range(len(ft_losses)):
    opt.zero_grad()
    loss = loss_of(model)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    torch_losses.append(float(loss))
rel = max(abs(a - b) / abs(b) for a, b in zip(ft_losses, torch_losses))
print(json.dumps({"check": "20 SFT losses vs torch+PEFT", "max_rel_diff": rel,
                  "ft": [round(x, 6) for x in ft_losses], "torch": [round(x, 6) for x in torch_losses]}))
sys.exit(0 if rel <= 1e-3 and abs(peft_eval - summary["eval_loss"]) <= 1e-4 else 1)
