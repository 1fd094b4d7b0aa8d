//! GGUF tensor names ↔ Hugging Face names, and llama.cpp's Q/K row permutation.
//!
//! llama.cpp's `convert_hf_to_gguf.py` names tensors after `gguf.constants.TENSOR_NAMES`
//! (`blk.{i}.attn_q`, ...) and, for the `llama` architecture, reorders the rows of
//! `q_proj` / `k_proj` (`LlamaModel.permute`) so that its RoPE rotates adjacent pairs
//! instead of transformers' two halves. [`llama_unpermute_rows`] undoes that, so weights and
//! adapters address the HF layout.

/// `(GGUF, HF)` names of the tensors outside the decoder blocks.
const GLOBAL: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// `(GGUF, HF)` names inside decoder block `i` (`blk.{i}.` / `model.layers.{i}.`), as
/// `gguf`'s tensor map has them for Llama-like files; [`ARCH_BLOCK`] overrides them.
const BLOCK: [(&str, &str); 12] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("attn_qkv", "self_attn.qkv_proj"),
];

/// `(architecture, GGUF, HF)`: block tensors an architecture names its own way. Phi-3's
/// `ffn_up` holds gate and up; Gemma 3's four norms are `attn_norm`,
/// `post_attention_norm` (on the attention output), `ffn_norm` (before the MLP) and
/// `post_ffw_norm`.
const ARCH_BLOCK: [(&str, &str, &str); 4] = [
    ("phi3", "ffn_up", "mlp.gate_up_proj"),
    ("gemma3", "post_attention_norm", "post_attention_layernorm"),
    ("gemma3", "ffn_norm", "pre_feedforward_layernorm"),
    ("gemma3", "post_ffw_norm", "post_feedforward_layernorm"),
];

/// Split `name.weight` / `name.bias` into the module and the suffix.
fn split_suffix(name: &str) -> Option<(&str, &str)> {
    let (module, suffix) = name.rsplit_once('.')?;
    matches!(suffix, "weight" | "bias").then_some((module, suffix))
}

/// Split `{prefix}{layer}.{part}` into the layer and the part.
fn split_layer<'a>(module: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (layer, part) = module.strip_prefix(prefix)?.split_once('.')?;
    Some((layer.parse().ok()?, part))
}

/// The HF name of GGUF tensor `gguf` in a file of architecture `arch`
/// (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; in a `phi3` file
/// `blk.3.ffn_up.weight` → `model.layers.3.mlp.gate_up_proj.weight`), or `None` for a
/// tensor legora's models do not have (`rope_freqs.weight`, ...).
pub fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    let (module, suffix) = split_suffix(gguf)?;
    if let Some((_, hf)) = GLOBAL.iter().find(|(g, _)| *g == module) {
        return Some(format!("{hf}.{suffix}"));
    }
    let (layer, part) = split_layer(module, "blk.")?;
    let hf = match ARCH_BLOCK.iter().find(|(a, g, _)| *a == arch && *g == part) {
        Some((_, _, hf)) => *hf,
        None => BLOCK.iter().find(|(g, _)| *g == part)?.1,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The GGUF name of HF tensor `hf` in a file of architecture `arch` (the inverse of
/// [`hf_name`]).
pub fn gguf_name(hf: &str, arch: &str) -> Option<String> {
    let (module, suffix) = split_suffix(hf)?;
    if let Some((g, _)) = GLOBAL.iter().find(|(_, h)| *h == module) {
        return Some(format!("{g}.{suffix}"));
    }
    let (layer, part) = split_layer(module, "model.layers.")?;
    let g = match ARCH_BLOCK.iter().find(|(a, _, h)| *a == arch && *h == part) {
        Some((_, g, _)) => *g,
        None => BLOCK.iter().find(|(_, h)| *h == part)?.0,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Whether llama.cpp stored this HF tensor of an `arch` file with 1 added: Gemma's norms
/// scale by `1 + weight`, and `convert_hf_to_gguf.py` folds the 1 in (`data_torch + 1` for
/// every `norm.weight`), as transformers' `Gemma2TensorProcessor` undoes (`weights - 1`).
pub fn norm_plus_one(hf: &str, arch: &str) -> bool {
    arch == "gemma3" && hf.ends_with("norm.weight")
}

/// Undo `LlamaModel.permute(w, n_head, n_head)` of `convert_hf_to_gguf.py` on the rows of a
/// row-major tensor (`row_len` items per row; a bias has `row_len` 1): llama.cpp stores the
/// HF row `h·2d + j·d + i` (head `h`, half `j`, pair `i`, `d` = rows / n_head / 2) at row
/// `h·2d + i·2 + j`. This is transformers' `LlamaTensorProcessor._reverse_permute_weights`:
/// `w.reshape(n_head, d, 2, ...).swapaxes(2, 1).reshape(w.shape)`.
///
/// Works on any row payload: f32 values, or (for block-quantized weights, whose rows are
/// whole blocks) the raw bytes of each row with `row_len` = bytes per row. `None` when the
/// rows are not `2 · n_head` equal groups.
pub fn llama_unpermute_rows<T: Copy>(data: &[T], row_len: usize, n_head: usize) -> Option<Vec<T>> {
    if row_len == 0 || n_head == 0 || data.len() % row_len != 0 {
        return None;
    }
    let rows = data.len() / row_len;
    if rows % (2 * n_head) != 0 {
        return None;
    }
    let d = rows / n_head / 2;
    let mut out = Vec::with_capacity(data.len());
    for hf_row in 0..rows {
        let (h, r) = (hf_row / (2 * d), hf_row % (2 * d));
        let (j, i) = (r / d, r % d);
        let src = h * 2 * d + i * 2 + j;
        out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.11.attn_k.bias",
                "model.layers.11.self_attn.k_proj.bias",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "blk.2.attn_output.weight",
                "model.layers.2.self_attn.o_proj.weight",
            ),
        ] {
            assert_eq!(hf_name(g, "llama").as_deref(), Some(h));
            assert_eq!(gguf_name(h, "llama").as_deref(), Some(g));
        }
        for (g, h) in [
            (
                "blk.1.attn_qkv.weight",
                "model.layers.1.self_attn.qkv_proj.weight",
            ),
            (
                "blk.1.ffn_up.weight",
                "model.layers.1.mlp.gate_up_proj.weight",
            ),
        ] {
            assert_eq!(hf_name(g, "phi3").as_deref(), Some(h));
            assert_eq!(gguf_name(h, "phi3").as_deref(), Some(g));
        }
        for (g, h) in [
            (
                "blk.0.post_attention_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.0.post_ffw_norm.weight",
                "model.layers.0.post_feedforward_layernorm.weight",
            ),
        ] {
            assert_eq!(hf_name(g, "gemma3").as_deref(), Some(h));
            assert_eq!(gguf_name(h, "gemma3").as_deref(), Some(g));
        }
        assert!(norm_plus_one(
            "model.layers.0.self_attn.q_norm.weight",
            "gemma3"
        ));
        assert!(!norm_plus_one("model.norm.weight", "llama"));
        assert_eq!(
            hf_name("blk.1.ffn_up.weight", "llama").as_deref(),
            Some("model.layers.1.mlp.up_proj.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight", "llama"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight", "llama"), None);
        assert_eq!(
            gguf_name("model.layers.0.mlp.experts.0.weight", "llama"),
            None
        );
    }

    #[test]
    fn unpermute_inverts_convert_hf_to_gguf() {
        // 2 heads of head_dim 4 (d = 2): HF rows 0..8. permute: reshape(2, 2, 2).swapaxes(1, 2)
        // → GGUF row order [0, 2, 1, 3, 4, 6, 5, 7] (head 0: (j, i) = (0,0) (1,0) (0,1) (1,1)).
        let gguf_rows = [0, 2, 1, 3, 4, 6, 5, 7];
        let data: Vec<i32> = gguf_rows
            .iter()
            .flat_map(|&r| [r * 10, r * 10 + 1])
            .collect();
        let hf = llama_unpermute_rows(&data, 2, 2).unwrap();
        let want: Vec<i32> = (0..8).flat_map(|r| [r * 10, r * 10 + 1]).collect();
        assert_eq!(hf, want);
        assert!(llama_unpermute_rows(&data, 2, 3).is_none());
    }
}
