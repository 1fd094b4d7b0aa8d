"""legora vs PyTorch + transformers + PEFT, same cases, same machine, same thread count.

    cargo build --release -p legora-cli
    ~/.cache/legora-venv/bin/python bench/compare_peft.py [--steps 8] [--warmup 2] [--threads N]
        [--cases S-qv,S-all,S-moe,S-concurrent] [--repeat N] [--json-out results.jsonl]

    # on a CUDA GPU (legora built with `--features cuda`): the G- cases
    cargo build --release -p legora-cli --features cuda
    python bench/compare_peft.py --gpu [--cases G-qv,G-all,G-concurrent]

Each run is a fresh subprocess (so its peak RSS is its own): first the PyTorch side of a
case (this script with --worker), then `target/release/legora bench --case <case> --json`.
Both get the same thread count (torch.set_num_threads + OMP_NUM_THREADS,
RAYON_NUM_THREADS). Prints one JSON line per run, then a table with the ratio
legora / PyTorch (tokens/s: > 1 means legora is faster; peak RSS: < 1 means legora uses
less) and the mixture checks (the mixture's cost over one adapter, concurrent vs one after another),
from legora's own runs.

Cases (random weights: speed does not depend on weight values). Every case: Qwen2 shape
(hidden 512, 8 layers, 8 heads / 2 KV heads, intermediate 1408, vocab 8192, tied
embeddings, q/k/v bias), f32, batch 4 x seq 256 of random token ids with labels = inputs,
LoRA r=8 alpha=16 dropout 0.05, AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight
decay 0.01), global-norm clipping at 1.0. A step is forward + loss, backward, clipping,
optimizer step; warmup steps are not timed.
  S-qv          LoRA on q_proj, v_proj (PEFT).
  S-all         LoRA on all seven linear projections (PEFT).
  S-moe         4 experts on all seven projections, one top-2 router per decoder layer
                reading the layer's normalized input (as legora), load-balancing aux loss
                (coef 0.01); the PyTorch side is a plain MixLoRA-style mixture written
                below (a per-expert loop over the tokens routed to it).
  S-concurrent  3 adapters (all seven projections). PyTorch: PEFT trains them one after
                another (set_adapter, batch 4 each, `steps` steps each), which is what
                PEFT offers. legora: one task-routed run over one shared frozen base,
                batch 3 x 4 with forward + backward per task (`S-concurrent`, as
                `[data] backward_per_task`) and in one pass (`S-concurrent-batched`), and, for
                the mixture checks, the same three trained one after another
                (`S-concurrent-seq`).

GPU cases (`--gpu`: both sides on the first CUDA device, legora with `--backend cuda`): the
M shape (Qwen2-0.5B: hidden 896, 24 layers, 14 / 2 heads, intermediate 4864, vocab 151936,
tied), frozen base in bf16 (PyTorch: the model cast to bfloat16; PEFT keeps the adapters
f32), the same LoRA and optimizer settings.
  G-qv          LoRA on q_proj, v_proj, batch 8 x seq 512.
  G-all         LoRA on all seven projections, batch 8 x seq 512.
  G-concurrent  3 adapters (all seven projections), 1 x 256 rows each: PEFT one after
                another, legora one task-routed run of 3 x 1 rows.
Peak GPU memory is what `nvidia-smi` reports for the process (sampled every 50 ms), the
same measure on both sides; PyTorch's own `max_memory_allocated` is printed too.

Storage and shape flags, passed to both sides (legora: the same `legora bench` flags):
  --shape S|M|L       the model (S above; M = Qwen2-0.5B; L = Qwen2-7B, untied), the case's
                      batch unless --batch / --seq.
  --dtype bf16|f16    the frozen base in that dtype (PyTorch: the model cast to it).
  --quantize nf4|fp4|int8 [--double-quant]
                      QLoRA on the PyTorch side: the random model is saved to a temporary
                      folder by a separate process (not measured), then loaded with
                      `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...,
                      bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=torch.bfloat16)`
                      (or `load_in_8bit=True`), embeddings and lm_head in bf16.
  --gradient-checkpointing
                      `model.gradient_checkpointing_enable()` (+ `enable_input_require_grads`,
                      as PEFT needs with a frozen embedding) and legora's
                      `--gradient-checkpointing`.
  --timeout S         give up on a PyTorch run after S seconds and record that it did
                      (PEFT + bitsandbytes on a CPU is slow: one NF4 step of the S model
                      took ~55 s here).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["S-qv", "S-all", "S-moe", "S-concurrent"]
GPU_CASES = ["G-qv", "G-all", "G-concurrent"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 512, 8, 8, 2, 1408, 8192
BATCH, SEQ = 4, 256
# the M shape of the G- cases
M_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)


def batch_shape(case):
    """(rows, tokens per row) of one adapter's batch."""
    if case in ("G-qv", "G-all"):
        return 8, 512
    if case == "G-concurrent":
        return 1, 256
    return BATCH, SEQ
SHAPES = {
    "S": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, intermediate_size=INTER, vocab_size=VOCAB,
              tie_word_embeddings=True),
    "M": dict(M_SHAPE, tie_word_embeddings=True),
    "L": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
              tie_word_embeddings=False),
}
R, ALPHA, DROPOUT = 8, 16, 0.05
LR, CLIP = 1e-4, 1.0


def qwen2_config(shape=None):
    from transformers import Qwen2Config

    shape = dict(shape or SHAPES["S"])
    shape.setdefault("tie_word_embeddings", True)
    cfg = Qwen2Config(**shape, max_position_embeddings=4096,
                      attention_dropout=0.0, use_cache=False)
    # sdpa: PyTorch's fused attention, the transformers default
    cfg._attn_implementation = "sdpa"
    return cfg


def qwen2_small(shape=None):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM(qwen2_config(shape))


def prepare(shape_name, folder):
    """Save a random model of `shape_name` to `folder` (bf16 safetensors), for a worker
    that loads it quantized; run as its own process so its memory is not measured."""
    import torch

    torch.manual_seed(0)
    model = qwen2_small(SHAPES[shape_name]).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def load_quantized(folder, quantize, double_quant):
    """The saved random model loaded as bitsandbytes stores it on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantize == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                               bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q,
                                                torch_dtype=torch.bfloat16,
                                                device_map="cpu")


def make_moe_linear(base, experts, store):
    """A frozen linear with `experts` LoRA experts, MixLoRA style: each expert runs on
    the tokens routed to it (gathered), its output is weighted by the token's gate and
    scattered back. Gates come from the decoder layer's router through `store`."""
    import torch
    from torch import nn

    class MoeLoraLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            # PEFT's init: A kaiming-uniform(a=sqrt(5)), B zero
            self.A = nn.ParameterList()
            for _ in range(experts):
                a = torch.empty(R, base.in_features)
                nn.init.kaiming_uniform_(a, a=5 ** 0.5)
                self.A.append(nn.Parameter(a))
            self.B = nn.ParameterList(
                [nn.Parameter(torch.zeros(base.out_features, R)) for _ in range(experts)])
            self.drop = nn.Dropout(DROPOUT)
            self.scale = ALPHA / R

        def forward(self, x):
            y = self.base(x)
            weights, idx = store["gates"]  # [N, k], [N, k]
            flat = x.reshape(-1, x.shape[-1])
            out = torch.zeros(flat.shape[0], y.shape[-1], dtype=y.dtype, device=y.device)
            for e in range(len(self.A)):
                tok, slot = torch.where(idx == e)
                if tok.numel() == 0:
                    continue
                h = self.drop(flat[tok]) @ self.A[e].T @ self.B[e].T
                out.index_add_(0, tok, h * (weights[tok, slot, None] * self.scale))
            return y + out.reshape(y.shape)

    return MoeLoraLinear()


def attach_moe(model, experts=4, k=2, aux_coef=0.01):
    """Freeze the model, put a mixture on all seven projections of every layer and a
    top-k router per layer reading `input_layernorm`'s output (legora's router input
    when the attention projections hold experts). Returns the model and the list the
    routers append their aux losses to (clear it before each forward)."""
    import torch
    from torch import nn

    for p in model.parameters():
        p.requires_grad_(False)
    aux = []
    routers = []
    for layer in model.model.layers:
        store = {}
        router = nn.Linear(HIDDEN, experts, bias=False)
        nn.init.normal_(router.weight, std=0.02)
        routers.append(router)

        def route(mod, inputs, output, router=router, store=store):
            h = output
            logits = router(h.reshape(-1, h.shape[-1]))
            probs = torch.softmax(logits.float(), dim=-1)
            w, idx = torch.topk(probs, k, dim=-1)
            store["gates"] = (w / w.sum(-1, keepdim=True), idx)
            # Switch / Mixtral load balancing: coef * E * sum_e f_e * P_e
            frac = torch.zeros_like(probs).scatter(1, idx, 1.0).mean(0) / k
            aux.append(aux_coef * experts * (frac * probs.mean(0)).sum())

        # a forward hook on the norm: runs with every layer call, whatever the call's
        # argument layout (positional or keyword, transformers 4 or 5)
        layer.input_layernorm.register_forward_hook(route)
        for parent in (layer.self_attn, layer.mlp):
            for name in ALL:
                if hasattr(parent, name):
                    setattr(parent, name, make_moe_linear(getattr(parent, name), experts, store))
    model.moe_routers = nn.ModuleList(routers)
    return model, aux


def peak_rss_mb():
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / (1024.0 * 1024.0) if sys.platform == "darwin" else v / 1024.0


def worker(case, steps, warmup, threads, gpu=False, opts=None):
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model

    opts = opts or argparse.Namespace(shape=None, dtype=None, quantize=None,
                                      double_quant=False, gradient_checkpointing=False,
                                      model_dir=None, batch=None, seq=None)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = "cuda" if gpu else "cpu"
    shape = SHAPES[opts.shape] if opts.shape else (M_SHAPE if gpu else None)
    if opts.quantize:
        model = load_quantized(opts.model_dir, opts.quantize, opts.double_quant)
    else:
        model = qwen2_small(shape)
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(
            opts.dtype or ("bf16" if gpu else "f32"), torch.float32)
        model = model.to(dtype=dtype, device=device)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    vocab = model.config.vocab_size
    rows, seq = batch_shape(case)
    rows, seq = opts.batch or rows, opts.seq or seq
    aux = None
    lora = lambda targets: LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,  # noqa: E731
                                      target_modules=targets)
    if case == "S-moe":
        model, aux = attach_moe(model)
    elif case in ("S-qv", "G-qv"):
        model = get_peft_model(model, lora(["q_proj", "v_proj"]))
    elif case in ("S-all", "S-concurrent", "G-all", "G-concurrent"):
        model = get_peft_model(model, lora(ALL))
    else:
        raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES + GPU_CASES)}")
    adapters = [None]
    if case in ("S-concurrent", "G-concurrent"):
        for name in ("t1", "t2"):
            model.add_adapter(name, lora(ALL))
        adapters = ["default", "t1", "t2"]
    model.train()
    times, trainable = [], 0
    started = time.perf_counter()
    for adapter in adapters:
        if adapter is not None:
            model.set_adapter(adapter)  # only this adapter is active and trainable
        params = [p for p in model.parameters() if p.requires_grad]
        trainable += sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        for step in range(warmup + steps):
            x = torch.randint(0, vocab, (rows, seq), device=device)
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if aux is not None:
                aux.clear()
            loss = model(input_ids=x, labels=x).loss
            if aux:
                loss = loss + sum(aux)
            loss_value = loss.item()  # legora's trainer reads the loss too
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            if gpu:
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    tokens = rows * seq
    med = statistics.median(times)
    out = {"impl": "pytorch+peft" if case != "S-moe" else "pytorch (MixLoRA-style loop)",
           "case": case, "threads": threads, "steps": steps, "timed_steps": len(times),
           "warmup": warmup, "tokens_per_step": tokens, "step_s_median": med,
           "step_s_min": min(times), "step_s_max": max(times),
           "tokens_per_s": tokens / med, "total_s": sum(times),
           "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
           "trainable_params": trainable, "last_loss": loss_value,
           "storage": storage_name(opts), "shape": opts.shape,
           "gradient_checkpointing": opts.gradient_checkpointing,
           "bitsandbytes": bnb_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__}
    if gpu:
        out["device"] = torch.cuda.get_device_name(0)
        out["torch_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def storage_name(opts):
    if opts.quantize:
        dq = "-dq" if opts.double_quant and opts.quantize != "int8" else ""
        return f"{opts.quantize}{dq} projections, embeddings and lm_head bf16"
    return {"bf16": "bfloat16", "f16": "float16"}.get(opts.dtype, "float32")


def bnb_version():
    try:
        import bitsandbytes
        return bitsandbytes.__version__
    except ImportError:
        return None


def gpu_memory_mb(pid):
    """What `nvidia-smi` reports for process `pid` (MiB), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return None


def run_json(cmd, env, gpu=False, timeout=None):
    """Run `cmd`, return its last JSON line; with `gpu`, add the process's peak GPU
    memory as `nvidia-smi` sampled it (`peak_gpu_mb`). Past `timeout` seconds the run is
    stopped and a record saying so is returned."""
    if not gpu:
        started = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"timed_out": True, "timeout_s": timeout,
                    "wall_s": time.perf_counter() - started, "tokens_per_s": None,
                    "peak_rss_mb": None, "cmd": " ".join(cmd)}
    else:
        import threading
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        peak = [None]
        def sample():
            while proc.poll() is None:
                m = gpu_memory_mb(proc.pid)
                if m is not None and (peak[0] is None or m > peak[0]):
                    peak[0] = m
                time.sleep(0.05)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        sampler.join()
        res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}")
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON from: {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    r = json.loads(lines[-1])
    if gpu:
        r["peak_gpu_mb"] = peak[0]
    return r


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratio(a, b):
    return a / b if a and b else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, from {','.join(CASES)}")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="threads for both sides (default: all cores)")
    ap.add_argument("--legora", default=str(ROOT / "target" / "release" / "legora"),
                    help="the legora binary (default target/release/legora)")
    ap.add_argument("--json-out", help="also write every run's JSON line to this file")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each side per case, alternating PyTorch and legora; the "
                         "table shows each side's median (default 1)")
    ap.add_argument("--gpu", action="store_true",
                    help="the G- cases on the first CUDA device (legora --backend cuda)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="the model shape of every case")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="the frozen base's dtype")
    ap.add_argument("--quantize", choices=["nf4", "fp4", "int8"],
                    help="bitsandbytes storage of the frozen projections (QLoRA)")
    ap.add_argument("--double-quant", action="store_true",
                    help="with --quantize nf4|fp4: bnb_4bit_use_double_quant")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each decoder layer in the backward (both sides)")
    ap.add_argument("--batch", type=int, help="rows per adapter batch (both sides)")
    ap.add_argument("--seq", type=int, help="tokens per row (both sides)")
    ap.add_argument("--timeout", type=float,
                    help="stop a PyTorch run after this many seconds and record it")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.shape or "S", args.prepare)
        return
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.threads, args.gpu, args)
        return
    known = GPU_CASES if args.gpu else CASES
    if args.gpu and args.cases == ",".join(CASES):
        args.cases = ",".join(GPU_CASES)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in known]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; cases{' with --gpu' if args.gpu else ''}: "
                         f"{', '.join(known)}")
    if not Path(args.legora).is_file():
        raise SystemExit(f"{args.legora} not found: run `cargo build --release -p legora-cli` first")
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        raise SystemExit("--steps and --repeat must be >= 1 and --warmup >= 0")
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, RAYON_NUM_THREADS=t)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    for flag in ("shape", "dtype", "quantize", "batch", "seq"):
        if getattr(args, flag) is not None:
            common += [f"--{flag}", str(getattr(args, flag))]
    for flag in ("double_quant", "gradient_checkpointing"):
        if getattr(args, flag):
            common.append("--" + flag.replace("_", "-"))
    worker_extra = []
    if args.quantize:
        import tempfile
        folder = tempfile.mkdtemp(prefix="legora-bench-model-")
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", folder]
                       + (["--shape", args.shape] if args.shape else []), check=True, env=env)
        worker_extra = ["--model-dir", folder]
    records = []

    def record(r):
        print(json.dumps(r), flush=True)
        records.append(r)
        return r

    rows = []
    legora = {}
    def median_run(runs):
        """The run with the median tokens/s; its peak RSS replaced by the median RSS."""
        runs = sorted(runs, key=lambda r: r["tokens_per_s"])
        mid = dict(runs[(len(runs) - 1) // 2])
        runs = [r for r in runs if not r.get("timed_out")] or runs
        if runs[0].get("timed_out"):
            return runs[0]
        rss = sorted(r["peak_rss_mb"] or 0.0 for r in runs)
        mid["peak_rss_mb"] = rss[(len(rss) - 1) // 2]
        return mid

    for case in cases:
        # alternate the two sides, so a slow spell of a noisy machine hits both
        pts, lgs = [], []
        extras = {"S-concurrent-batched": [], "S-concurrent-seq": []}
        for _ in range(args.repeat):
            gpu_flag = ["--gpu"] if args.gpu else []
            backend = ["--backend", "cuda"] if args.gpu else []
            pts.append(record(run_json([sys.executable, str(Path(__file__).resolve()),
                                        "--worker", case, "--threads", t] + gpu_flag + common
                                       + worker_extra, env, args.gpu, args.timeout)))
            lgs.append(record(run_json([args.legora] + backend + ["bench", "--case", case,
                                                                 "--json"] + common,
                                       env, args.gpu)))
            if case == "S-concurrent":
                for extra, runs in extras.items():
                    runs.append(record(run_json(
                        [args.legora, "bench", "--case", extra, "--json"] + common, env)))
        pt, lg = median_run(pts), median_run(lgs)
        legora[case] = lg
        rows.append((case, pt, lg))
        if case == "S-concurrent":
            for extra, runs in extras.items():
                legora[extra] = median_run(runs)
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(r) + "\n" for r in records))

    pt0 = rows[0][1] if rows else {}
    print()
    print(f"storage: {rows[0][2].get('storage') if rows else '?'}"
          + (f"; shape {args.shape}" if args.shape else "")
          + ("; gradient checkpointing" if args.gradient_checkpointing else ""))
    print(f"CPU: {cpu_name()}, {args.threads} threads; legora {rows[0][2]['backend'] if rows else '?'}"
          f" backend; torch {pt0.get('torch')}, transformers {pt0.get('transformers')}, "
          f"peft {pt0.get('peft')}; {args.steps} timed steps after {args.warmup} warmup"
          + (f"; median of {args.repeat} alternating runs per side" if args.repeat > 1 else ""))
    print()
    print("| case | PyTorch tok/s | legora tok/s | tok/s ratio (legora/PyTorch) "
          "| PyTorch peak RSS MB | legora peak RSS MB | RSS ratio (legora/PyTorch) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, p, q in rows:
        if p.get("timed_out"):
            print(f"| {case} | > {p['timeout_s']:.0f} s (stopped) | {q['tokens_per_s']:.0f} "
                  f"| - | - | {q['peak_rss_mb'] or float('nan'):.0f} | - |")
            continue
        print(f"| {case} | {p['tokens_per_s']:.0f} | {q['tokens_per_s']:.0f} "
              f"| {ratio(q['tokens_per_s'], p['tokens_per_s']):.2f}x "
              f"| {p['peak_rss_mb']:.0f} | {q['peak_rss_mb'] or float('nan'):.0f} "
              f"| {ratio(q['peak_rss_mb'], p['peak_rss_mb']):.2f} |")
    if args.gpu:
        print()
        print(f"GPU: {pt0.get('device')}")
        print()
        print("| case | PyTorch peak GPU MB | legora peak GPU MB | ratio (legora/PyTorch) "
              "| PyTorch max_memory_allocated MB |")
        print("|---|---:|---:|---:|---:|")
        for case, p, q in rows:
            pg, qg = p.get("peak_gpu_mb"), q.get("peak_gpu_mb")
            print(f"| {case} | {pg or float('nan'):.0f} | {qg or float('nan'):.0f} "
                  f"| {ratio(qg, pg):.2f} | {p.get('torch_max_allocated_mb') or float('nan'):.0f} |")
    if "S-concurrent" in legora:
        print()
        print("S-concurrent: PyTorch = PEFT training the 3 adapters one after another (batch 4); "
              "legora = one task-routed run (batch 3x4, forward + backward per task).")
        p = next(p for c, p, _ in rows if c == "S-concurrent")
        q = legora["S-concurrent"]
        print(f"  total time of the timed steps: PyTorch {p['total_s']:.1f} s, "
              f"legora {q['total_s']:.1f} s (ratio {ratio(q['total_s'], p['total_s']):.2f})")

    checks = []
    if "S-moe" in legora and "S-all" in legora:
        v = ratio(legora["S-moe"]["step_s_median"], legora["S-all"]["step_s_median"])
        checks.append(("S-moe step / S-all step (legora)", v, "<= 1.4", v <= 1.4))
        p_moe = next((p for c, p, _ in rows if c == "S-moe"), None)
        p_all = next((p for c, p, _ in rows if c == "S-all"), None)
        if p_moe and p_all:
            checks.append(("S-moe step / S-all step (PyTorch, for reference)",
                           ratio(p_moe["step_s_median"], p_all["step_s_median"]), "", None))
    if "S-concurrent" in legora:
        c, s = legora["S-concurrent"], legora["S-concurrent-seq"]
        cb = legora["S-concurrent-batched"]
        v = ratio(c["total_s"], s["total_s"])
        checks.append(("S-concurrent / S-concurrent-seq wall time (legora, same steps per expert)",
                       v, "<= 0.9", v <= 0.9))
        v = ratio(cb["total_s"], s["total_s"])
        checks.append(("S-concurrent-batched (one pass over 3x4 rows) / S-concurrent-seq wall time",
                       v, "<= 0.9", v <= 0.9))
        # one single-expert run: S-all in its own process (batch 4, all seven
        # projections); else the sequential run, whose experts share one base
        single = legora.get("S-all", s)
        name = "S-all" if "S-all" in legora else "S-concurrent-seq"
        v = ratio(c["peak_rss_mb"], single["peak_rss_mb"])
        checks.append((f"S-concurrent peak RSS / one single-expert run ({name}) (legora)",
                       v, "<= 1.25", v <= 1.25))
        v = ratio(cb["peak_rss_mb"], single["peak_rss_mb"])
        checks.append((f"S-concurrent-batched peak RSS / one single-expert run ({name})",
                       v, "<= 1.25", v <= 1.25))
    if checks:
        print()
        print("| mixture check | value | target | met |")
        print("|---|---:|---|---|")
        for name, v, target, ok in checks:
            met = "" if ok is None else ("yes" if ok else "no")
            print(f"| {name} | {v:.2f} | {target} | {met} |")


if __name__ == "__main__":
    main()
