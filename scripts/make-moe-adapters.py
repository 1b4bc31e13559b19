"""PEFT 0.21 LoRA adapters on the tiny MoE oracle models, experts included, as PEFT writes them.

transformers 5 holds experts as fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]), which `target_modules` cannot reach: PEFT 0.21 targets them
with `target_parameters`. For each of `models/qwen3-moe` and `models/mixtral` this writes
`adapters/<model>-experts-r4/` (r 4, alpha 8, attention projections by `target_modules`, both
expert parameters by `target_parameters`, every lora_B filled with seeded noise so the adapter
changes the output), the adapter loaded back from its files, and `expected_logits.safetensors`
(`logits_<i>` per `chat_tokens.json` case, float32) and the merged model's logits check.

Usage: python scripts/make-moe-adapters.py tests/fixtures   (torch, transformers 5.24, peft 0.21)
"""
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

root = Path(sys.argv[1])
cases = json.loads((root / "chat_tokens.json").read_text())
torch.manual_seed(7)
for name in ["qwen3-moe", "mixtral"]:
    base_dir = root / "models" / name
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    out = root / "adapters" / f"{name}-experts-r4"
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = f"../../models/{name}"
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    logits = {}
    with torch.no_grad():
        for i, case in enumerate(cases):
            ids = torch.tensor([case["input_ids"]])
            logits[f"logits_{i}"] = loaded(ids).logits[0].float().contiguous()
        merged = loaded.merge_and_unload()
        worst = max((merged(torch.tensor([c["input_ids"]])).logits[0] - logits[f"logits_{i}"]).abs().max().item() for i, c in enumerate(cases))
    save_file(logits, out / "expected_logits.safetensors")
    print(name, "saved", out, "merged vs adapter max abs", worst)
