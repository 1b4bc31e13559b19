"""Loads an adapter written by ft onto its base with PEFT 0.21 and prints PEFT's mean
assistant-only loss over `chat.jsonl` (ChatML tokens of `chat_tokens.json`), for comparison with
`ft eval --adapter ... --json` (the adapter PEFT reads must compute what ft computed).

Usage: python scripts/peft-check-loss.py MODEL_DIR ADAPTER_DIR tests/fixtures/chat_tokens.json
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model_dir, adapter_dir, tokens = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
nll, count = 0.0, 0
with torch.no_grad():
    for case in json.loads(open(tokens).read()):
        ids = torch.tensor([case["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        mask = torch.tensor(case["assistant_mask"][1:], dtype=torch.bool)
        nll -= logp[torch.arange(len(target)), target][mask].sum().item()
        count += int(mask.sum())
print(json.dumps({"loss": nll / count, "tokens": count, "lora_parameters": trainable}))
