"""Writes a randomly initialised checkpoint of a given config's shape (transformers, float32), for
speed measurements on a machine without the real weights:
    python3 scripts/random-model.py CONFIG_DIR OUT_DIR
Copies the tokenizer files of CONFIG_DIR beside the weights."""
import json, shutil, sys

import torch
import transformers

src, out = sys.argv[1], sys.argv[2]
cfg = transformers.AutoConfig.from_pretrained(src)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.save_pretrained(out)
for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
    try:
        shutil.copy(f"{src}/{f}", f"{out}/{f}")
    except FileNotFoundError:
        pass
print(json.dumps({"out": out, "parameters": sum(p.numel() for p in model.parameters())}))
