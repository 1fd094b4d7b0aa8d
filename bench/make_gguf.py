"""A random-weight Qwen2-shaped GGUF file, quantized with the `gguf` package, for measuring
`legora bench --model FILE.gguf` (memory and speed over a GGUF base's blocks).

    ~/.cache/legora-venv/bin/python bench/make_gguf.py --shape M --type q4_0 --out m-q4_0.gguf
    target/release/legora bench --model m-q4_0.gguf --case S-qv --batch 1 --seq 512

Shapes as `legora bench --shape`: S (hidden 576, 30 layers), M (Qwen2-0.5B: hidden 896,
24 layers, 14 / 2 heads, intermediate 4864, vocabulary 151936, tied embeddings), L
(Qwen2-7B: hidden 3584, 28 layers, untied). Every 2-D tensor is stored as `--type` (the
embeddings too, as llama.cpp's pure quantizations do), norms and q/k/v biases as F32;
weights are normal(0, 0.02), generated and quantized one tensor at a time; `--type
q4_k_m` (`q4_k_s`, `q6_k`) writes F16 and has llama.cpp quantize it (llama-cpp-python). The tokenizer
is a SentencePiece-style vocabulary of that size (byte tokens, then `▁t<i>`), enough for
the file to load; the model is random, so only memory and speed mean anything.
"""

import argparse
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, GGUFWriter, TokenType
from gguf.quants import quantize

SHAPES = {
    "S": dict(hidden=576, layers=30, heads=9, kv_heads=3, inter=1536, vocab=49152, tied=True),
    "M": dict(hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, vocab=151936, tied=True),
    "L": dict(hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, vocab=152064, tied=False),
}
TYPES = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q8_0": Q.Q8_0, "f16": Q.F16}
# llama.cpp's own quantizations (`llama-quantize`'s file types), made from an F16 file by
# llama.cpp through llama-cpp-python (`pip install llama-cpp-python`): the `gguf` package
# has no K-quant encoder. Q4_K_M keeps most tensors in Q4_K, some in Q6_K, as llama.cpp does.
LLAMA_FTYPES = {"q4_k_m": 15, "q4_k_s": 14, "q6_k": 18}


def tensors(s):
    """(GGUF name, shape [out, in] or [n]) of every tensor, in file order."""
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    out = [("token_embd.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        b = f"blk.{i}"
        out += [
            (f"{b}.attn_norm.weight", (h,)),
            (f"{b}.attn_q.weight", (q, h)), (f"{b}.attn_q.bias", (q,)),
            (f"{b}.attn_k.weight", (kv, h)), (f"{b}.attn_k.bias", (kv,)),
            (f"{b}.attn_v.weight", (kv, h)), (f"{b}.attn_v.bias", (kv,)),
            (f"{b}.attn_output.weight", (h, q)),
            (f"{b}.ffn_norm.weight", (h,)),
            (f"{b}.ffn_gate.weight", (s["inter"], h)),
            (f"{b}.ffn_up.weight", (s["inter"], h)),
            (f"{b}.ffn_down.weight", (h, s["inter"])),
        ]
    out.append(("output_norm.weight", (h,)))
    if not s["tied"]:
        out.append(("output.weight", (s["vocab"], h)))
    return out


def llama_quantize(src: Path, out: Path, type_: str):
    """`src` (an F16 file) quantized by llama.cpp to its file type `type_` in `out`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[type_]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {type_} (code {rc})")


def write(out: Path, shape: str = "M", type_: str = "q4_0", seed: int = 0):
    """Writes the random `shape` model with its 2-D tensors as `type_` to `out`."""
    if type_ in LLAMA_FTYPES:
        f16 = out.with_name(out.stem + ".f16.gguf")
        write(f16, shape, "f16", seed)
        llama_quantize(f16, out, type_)
        f16.unlink()
        print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (llama.cpp {type_})")
        return
    s, qtype = SHAPES[shape], TYPES[type_]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(out, "qwen2")
    w.add_name(f"random-qwen2-{shape}-{type_}")
    w.add_context_length(4096)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["inter"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581t{i}" for i in range(s["vocab"] - len(pieces) - 3)]
    tokens = ["<unk>", "<s>", "</s>"] + pieces
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    w.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
                      + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * (len(tokens) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    # Tensor infos first, then each tensor generated and written in turn: only one tensor
    # is ever in memory (the L shape's F16 file is 15 GB).
    for name, shape_ in tensors(s):
        if len(shape_) == 1:
            w.add_tensor_info(name, shape_, np.float32, 4 * shape_[0])
        elif qtype == Q.F16:
            w.add_tensor_info(name, shape_, np.float16, 2 * shape_[0] * shape_[1])
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            row_bytes = shape_[1] // block * size
            w.add_tensor_info(name, (shape_[0], row_bytes), np.uint8, shape_[0] * row_bytes,
                              raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape_ in tensors(s):
        if len(shape_) == 1:
            v = np.ones(shape_, np.float32) if name.endswith("norm.weight") else \
                rng.normal(0, 0.02, shape_).astype(np.float32)
        else:
            v = rng.normal(0, 0.02, shape_).astype(np.float32)
            v = v.astype(np.float16) if qtype == Q.F16 else quantize(v, qtype)
        w.write_tensor_data(v)
    w.close()
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="M")
    ap.add_argument("--type", choices=[*TYPES, *LLAMA_FTYPES], default="q4_0")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write(a.out, a.shape, a.type, a.seed)


if __name__ == "__main__":
    main()
