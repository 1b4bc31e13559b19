"""OLoRA's initial adapter on the tiny llama as PEFT 0.21 computes it (torch.linalg.qr, f32):
tests/fixtures/olora/initial.safetensors, keyed as adapter_model.safetensors (lora_A = R_r,
lora_B = Q_r for every linear of the blocks; r 4, alpha 8). Needs torch, transformers, peft:

    python3 scripts/make-olora-oracle.py
"""
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

base = transformers.AutoModelForCausalLM.from_pretrained("tests/fixtures/models/llama", dtype=torch.float32)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora"))
out = {}
for name, p in model.named_parameters():
    if "lora_" in name:
        out[name.replace(".default", "")] = p.detach().contiguous()
save_file(out, "tests/fixtures/olora/initial.safetensors", metadata={"format": "pt", "peft": "0.21.2", "torch": torch.__version__})
print(len(out), "tensors")
