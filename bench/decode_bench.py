"""Single-stream decode speed: `legora generate` beside transformers' `generate`, on the
same model folder, prompt and thread count.

    python bench/decode_bench.py --legora target/release/legora --threads 2 --dtype bf16

The model is a random-weight Llama of SmolLM-135M's shape (hidden 576, 30 layers, 9 / 3
heads, intermediate 1536, vocabulary 49152, tied embeddings; 134.5M parameters, f32),
written once to `--model-dir` by transformers. Its tokenizer is the demo base's, padded
with added tokens to the model's vocabulary, so any id the model picks decodes.

Both sides decode greedily `--new-tokens` tokens after the same prompt and are timed the
same way: the wall time of one `generate` call (prefill and decode; loading excluded).
`--dtype` is the storage legora loads the f32 checkpoint in (`legora generate --dtype`);
transformers runs the checkpoint in float32 and, with `--hf-dtypes float32,bfloat16`, in
each listed dtype too; the ratio is against transformers' fastest.
legora reports it on stderr; transformers' call is timed around `model.generate`. The
two sides alternate, `--runs` times each; the medians and their ratio are printed,
with how many times per second the machine can read the f32 weights at all (a sum over
as many floats): a single f32 stream that reads each weight once per token cannot decode
faster. Needs torch and transformers (a venv outside the repository).

With `--gguf q4_0,q8_0` the same measurement runs on GGUF files instead: a random
Qwen2-architecture model of the same shape (`bench/make_gguf.py --shape S`, every 2-D
tensor in that type) is written once per type to `--model-dir`, and three sides decode
it: legora (the file's blocks kept in memory), llama.cpp through `llama-cpp-python`
(`pip install llama-cpp-python` builds it from source for this CPU; greedy, `n_threads`
as `--threads`) and transformers' `generate` on the model dequantized to float32 by its
GGUF loader (the first type's file). The prompt is llama.cpp's tokenization of the same
text; legora tokenizes it itself (the counts are printed). The ratios are legora against
llama.cpp on each type and against transformers:

    python bench/decode_bench.py --gguf q4_0,q8_0 --threads 2 --runs 5
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM_135M = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    pad_token_id=0,
)
PROMPT = "Patient presents with fever and a persistent cough; the first step is"


def make_model(out: Path):
    """The random SmolLM-135M-shape model and the padded demo tokenizer, in `out`."""
    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM_135M)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out)
    tok = Tokenizer.from_file(str(REPO / "demo/base/tokenizer.json"))
    have = tok.get_vocab_size(with_added_tokens=True)
    tok.add_tokens([AddedToken(f"<t{i}>", special=False)
                    for i in range(have, cfg.vocab_size)])
    assert tok.get_vocab_size(with_added_tokens=True) == cfg.vocab_size
    tok.save(str(out / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        src = REPO / "demo/base" / name
        if src.exists():
            (out / name).write_text(src.read_text())
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")


def legora_run(args, model_dir: Path, dtype=None):
    """(prompt tokens, new tokens, seconds) of one `legora generate`, as it reports them."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = [args.legora, "generate", "--model", str(model_dir), "--prompt", PROMPT,
           "--max-new-tokens", str(args.new_tokens), "--temperature", "0"]
    if dtype:
        cmd += ["--dtype", dtype]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    line = p.stderr.strip().splitlines()[-1]
    m = re.match(r"(\d+) prompt tokens, (\d+) new tokens in ([\d.]+) s", line)
    if not m:
        sys.exit(f"unexpected legora output: {line}")
    return int(m[1]), int(m[2]), float(m[3])


def timed_runs(sides, runs):
    """Runs each `(name, run)` side `runs` times, alternating; prints each run and returns
    the median tokens/s per side."""
    rates = {k: [] for k, _ in sides}
    for i in range(runs):
        for side, run in sides:
            prompt, new, dt = run()
            rates[side].append(new / dt)
            print(f"run {i + 1} {side:22s} prompt {prompt} tokens, {new} new in "
                  f"{dt:.3f} s: {new / dt:6.1f} tokens/s", flush=True)
    return {k: statistics.median(v) for k, v in rates.items()}


def gguf_main(args):
    """The GGUF comparison: legora, llama.cpp and transformers on the same files."""
    sys.path.insert(0, str(REPO / "bench"))
    import make_gguf
    import llama_cpp
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    types = [t.strip() for t in args.gguf.split(",") if t.strip()]
    out = Path(args.model_dir).with_name("smollm-135m-shape-gguf")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for t in types:
        files[t] = out / f"s-{t}.gguf"
        if not files[t].exists():
            make_gguf.write(files[t], "S", t)

    def llama_run(llm):
        tokens = llm.tokenize(PROMPT.encode())
        t0 = time.perf_counter()
        n = 0
        for _ in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == args.new_tokens:
                break
        return len(tokens), n, time.perf_counter() - t0

    sides = []
    llms = {}
    for t, f in files.items():
        legora_run(args, f)  # warm-up (page cache)
        sides.append((f"legora {t}", lambda f=f: legora_run(args, f)))
        llms[t] = llama_cpp.Llama(model_path=str(f), n_threads=args.threads,
                                  n_threads_batch=args.threads, n_ctx=512, verbose=False)
        llama_run(llms[t])  # warm-up
        sides.append((f"llama.cpp {t}", lambda llm=llms[t]: llama_run(llm)))

    torch.set_num_threads(args.threads)
    first = files[types[0]]
    hf = AutoModelForCausalLM.from_pretrained(
        str(first.parent), gguf_file=first.name, dtype=torch.float32).eval()
    ids = torch.tensor([llms[types[0]].tokenize(PROMPT.encode())])
    kw = dict(do_sample=False, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, pad_token_id=0)

    def hf_run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            o = hf.generate(ids, **kw)
            dt = time.perf_counter() - t0
        return ids.shape[1], o.shape[1] - ids.shape[1], dt

    hf_run()  # warm-up
    hf_side = f"transformers float32 ({types[0]} dequantized)"
    sides.append((hf_side, hf_run))
    med = timed_runs(sides, args.runs)
    print(json.dumps({
        "threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs,
        "llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__,
        **{f"{k.split(' (')[0].replace(' ', '_')}_tokens_per_s": round(v, 1)
           for k, v in med.items()},
        **{f"ratio_{t}_vs_llama_cpp": round(med[f"legora {t}"] / med[f"llama.cpp {t}"], 2)
           for t in types},
        **{f"ratio_{t}_vs_transformers_f32": round(med[f"legora {t}"] / med[hf_side], 2)
           for t in types},
    }))


def read_ceiling(n: int, threads: int) -> float:
    """How many times per second this machine reads `n` f32 values (a sum over them, by
    torch at `threads` threads, median of 10): a decoder that reads every weight once
    per token decodes one stream at most this many tokens per second."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(n)
    x.sum()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return 1 / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--legora", default=str(REPO / "target/release/legora"))
    ap.add_argument("--model-dir", default=str(REPO / "out/smollm-135m-shape"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"],
                    help="legora's storage of the frozen weights")
    ap.add_argument("--hf-dtypes", default="float32",
                    help="comma-separated torch dtypes transformers runs in")
    ap.add_argument("--gguf", default="",
                    help="comma-separated GGUF types (q4_0, q8_0, ...): run on GGUF files "
                         "beside llama.cpp instead")
    args = ap.parse_args()
    if args.gguf:
        return gguf_main(args)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        make_model(model_dir)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(do_sample=False, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, pad_token_id=0)
    hf_dtypes = [d.strip() for d in args.hf_dtypes.split(",") if d.strip()]
    models = {}
    for name in hf_dtypes:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, name)).eval()
        with torch.inference_mode():
            m.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=0)  # warm-up
        models[f"transformers {name}"] = m

    def hf_run(model):
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            dt = time.perf_counter() - t
        return ids.shape[1], out.shape[1] - ids.shape[1], dt

    legora_run(args, model_dir, args.dtype)  # warm-up (page cache)
    legora = f"legora {args.dtype}"
    sides = [(legora, lambda: legora_run(args, model_dir, args.dtype))]
    sides += [(k, (lambda m=m: hf_run(m))) for k, m in models.items()]
    med = timed_runs(sides, args.runs)
    best_hf = max((k for k in med if k != legora), key=med.get)
    numel = sum(p.numel() for p in next(iter(models.values())).parameters())
    ceiling = read_ceiling(numel, args.threads)
    print(f"reading {numel / 1e6:.1f}M f32 weights once: "
          f"{ceiling:.1f} times/s at {args.threads} threads (the single-stream f32 ceiling)")
    print(json.dumps({
        "threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "legora_dtype": args.dtype,
        **{f"{k.replace(' ', '_')}_tokens_per_s": round(v, 1) for k, v in med.items()},
        "ratio": round(med[legora] / med[best_hf], 2),
        "ratio_against": best_hf,
        "read_ceiling_per_s": round(ceiling, 1),
    }))


if __name__ == "__main__":
    main()
