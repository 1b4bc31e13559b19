//! How each model family ft trains is laid out in GGUF, both ways: llama.cpp's architecture
//! name, the Hugging Face ↔ GGUF tensor names, which projections llama.cpp's converter permutes
//! for its rotary layout, and Gemma's norm offset. `ft export gguf` and `ft import-gguf` read the
//! same table.

use crate::model::config::Family;

/// llama.cpp's architecture for a family (Mistral and Mixtral are `llama`, the latter with
/// experts).
pub fn arch_name(f: Family) -> &'static str {
    match f {
        Family::Llama | Family::Mistral | Family::Mixtral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
        Family::Qwen3Moe => "qwen3moe",
        Family::SmolLM3 => "smollm3",
        Family::Gemma2 => "gemma2",
        Family::Gemma3 => "gemma3",
        Family::Phi3 => "phi3",
    }
}

/// Whether llama.cpp's converter interleaves the rotary halves of q/k rows for this
/// architecture (its `LlamaModel.permute`; the NeoX-style families are stored as is).
pub fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "smollm3")
}

/// Gemma stores RMSNorm weights as `w` applied as `1 + w`; GGUF holds `1 + w`.
pub fn norm_offset(arch: &str) -> bool {
    matches!(arch, "gemma2" | "gemma3")
}

/// Per-layer tensors: the Hugging Face module under `model.layers.N.` and its GGUF name under
/// `blk.N.` (both without `.weight`/`.bias`).
pub fn block_tensors(arch: &str) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
    ];
    match arch {
        "gemma2" | "gemma3" => v.extend([
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
        ]),
        _ => v.push(("post_attention_layernorm", "ffn_norm")),
    }
    match arch {
        "phi3" => v.extend([("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up")]),
        _ => v.extend([("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up")]),
    }
    // Routers; the experts are stacked into ffn_{gate,up,down}_exps.
    v.extend([("mlp.gate", "ffn_gate_inp"), ("block_sparse_moe.gate", "ffn_gate_inp")]);
    v
}

/// The tensors outside the blocks: (Hugging Face, GGUF).
const TOP_LEVEL: [(&str, &str); 3] = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];

/// `<prefix><layer>.<module>.<kind>` → (layer, module, kind).
fn block_parts<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    Some((layer.parse().ok()?, module, kind))
}

/// The GGUF name of a Hugging Face tensor (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`), or `None` for names with no counterpart (experts are stacked).
pub fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    if let Some((_, g)) = TOP_LEVEL.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, module, kind) = block_parts(hf, "model.layers.")?;
    let g = block_tensors(arch).into_iter().find(|(h, _)| *h == module)?.1;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The Hugging Face name of a GGUF tensor, for a model of `family` (the inverse of
/// [`gguf_name`]; MoE routers take the family's module name).
pub fn hf_name(arch: &str, family: Family, name: &str) -> Option<String> {
    if let Some((h, _)) = TOP_LEVEL.iter().find(|(_, g)| *g == name) {
        return Some(h.to_string());
    }
    let (layer, module, kind) = block_parts(name, "blk.")?;
    let h = match module {
        "ffn_gate_inp" if family == Family::Mixtral => "block_sparse_moe.gate",
        m => block_tensors(arch).into_iter().find(|(_, g)| *g == m)?.0,
    };
    Some(format!("model.layers.{layer}.{h}.{kind}"))
}

/// llama.cpp's converter's q/k permutation: within each head, rows `(a, i)` (the two rotary
/// halves) are stored as `(i, a)` — interleaved pairs.
pub fn permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    permute_rows(w, rows, cols, heads, false)
}

/// The inverse of [`permute`].
pub fn unpermute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    permute_rows(w, rows, cols, heads, true)
}

fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize, inverse: bool) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for a in 0..2 {
                let split = h * 2 * half + a * half + i;
                let paired = h * 2 * half + i * 2 + a;
                let (src, dst) = if inverse { (paired, split) } else { (split, paired) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (arch, fam) in [("llama", Family::Llama), ("gemma2", Family::Gemma2), ("phi3", Family::Phi3), ("qwen3moe", Family::Qwen3Moe)] {
            for (h, _) in block_tensors(arch) {
                if h == "block_sparse_moe.gate" {
                    continue;
                }
                let hf = format!("model.layers.7.{h}.weight");
                let g = gguf_name(arch, &hf).unwrap();
                assert_eq!(hf_name(arch, fam, &g).unwrap(), hf, "{arch}");
            }
        }
        assert_eq!(gguf_name("gemma2", "model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.post_attention_norm.weight");
        assert_eq!(gguf_name("llama", "model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.ffn_norm.weight");
        assert_eq!(hf_name("llama", Family::Mixtral, "blk.1.ffn_gate_inp.weight").unwrap(), "model.layers.1.block_sparse_moe.gate.weight");
        assert!(gguf_name("llama", "model.layers.0.mlp.experts.0.up_proj.weight").is_none());
    }

    #[test]
    fn permute_matches_llama_cpp_and_inverts() {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (rows, cols, heads) = (8, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute(&w, rows, cols, heads);
        // head 0, rows (a=0,i=0), (a=1,i=0), (a=0,i=1), (a=1,i=1) = source rows 0, 2, 1, 3
        let row = |v: &[f32], r: usize| v[r * cols..(r + 1) * cols].to_vec();
        for (dst, src) in [(0, 0), (1, 2), (2, 1), (3, 3), (4, 4), (5, 6)] {
            assert_eq!(row(&p, dst), row(&w, src));
        }
        assert_eq!(unpermute(&p, rows, cols, heads), w);
    }
}
