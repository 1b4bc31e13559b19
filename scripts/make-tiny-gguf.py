#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/tiny-llama.gguf: a tiny llama-architecture GGUF (hidden 8, 2 query heads,
1 key/value head, 1 block, vocabulary of the 256 byte tokens plus 3 specials and 2 merges, f32 tensors
with seeded random values), written with the `gguf` Python package (llama.cpp's gguf-py). It is the
valid starting point of the GGUF header property test (tests/it/fuzz.rs). `pip install gguf numpy`."""
import pathlib
import numpy as np
import gguf

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/gguf/tiny-llama.gguf"
rng = np.random.default_rng(0)
hidden, heads, kv, ff, layers = 8, 2, 1, 16, 1
byte_tokens = [bytes([b]).decode("latin-1") for b in range(256)]
tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + ["ab", "abc"]
vocab = len(tokens)
w = gguf.GGUFWriter(str(out), "llama")
w.add_name("tiny-llama")
w.add_context_length(64)
w.add_embedding_length(hidden)
w.add_block_count(layers)
w.add_feed_forward_length(ff)
w.add_head_count(heads)
w.add_head_count_kv(kv)
w.add_layer_norm_rms_eps(1e-6)
w.add_rope_freq_base(10000.0)
w.add_vocab_size(vocab)
w.add_tokenizer_model("gpt2")
w.add_token_list(tokens)
w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
w.add_token_merges(["a b", "ab c"])
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
def t(name, *shape):
    w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
t("token_embd.weight", vocab, hidden)
t("output_norm.weight", hidden)
t("output.weight", vocab, hidden)
hd = hidden // heads
for i in range(layers):
    t(f"blk.{i}.attn_norm.weight", hidden)
    t(f"blk.{i}.attn_q.weight", heads * hd, hidden)
    t(f"blk.{i}.attn_k.weight", kv * hd, hidden)
    t(f"blk.{i}.attn_v.weight", kv * hd, hidden)
    t(f"blk.{i}.attn_output.weight", hidden, heads * hd)
    t(f"blk.{i}.ffn_norm.weight", hidden)
    t(f"blk.{i}.ffn_gate.weight", ff, hidden)
    t(f"blk.{i}.ffn_up.weight", ff, hidden)
    t(f"blk.{i}.ffn_down.weight", hidden, ff)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(out, out.stat().st_size)
