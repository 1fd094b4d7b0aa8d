"""legora vs PyTorch + transformers + PEFT, same cases, same machine, same thread count.

    cargo build --release -p legora-cli
    ~/.cache/legora-venv/bin/python bench/compare_peft.py [--steps 8] [--threads 2] [--cases S-qv,S-all]

Each case runs in a fresh subprocess (so peak RSS is that case's own), first in PyTorch,
then through `legora bench --case <case> --json`. Prints one JSON line per run and a
table with the ratio legora / PyTorch (tokens/s: higher is better for legora; RSS: lower).

Cases (random weights: speed does not depend on weight values):
  S-qv          Qwen2-shaped (hidden 512, 8 layers, 8 heads / 2 KV, intermediate 1408,
                vocab 8192, tied), batch 4 x seq 256, LoRA r=8 alpha=16 dropout 0.05 on
                q_proj,v_proj, AdamW.
  S-all         the same on all seven linear projections.
  S-moe         4 experts r=8 on all seven projections, one top-2 router per decoder layer
                with the load-balancing aux loss; the PyTorch side is a plain MixLoRA-style
                mixture written below (per-expert loop over routed tokens).
  S-concurrent  3 task-routed adapters in one run (batch 3x4) vs PEFT training the same 3
                adapters one after another (batch 4 each), same number of steps each.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["S-qv", "S-all", "S-moe", "S-concurrent"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen2_small():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=1408, vocab_size=8192,
                      tie_word_embeddings=True, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


class MoeLoraLinear:
    """MixLoRA-style: E LoRA experts on a frozen linear, gates from the layer's router."""

    def __new__(cls, base, experts, r, alpha, dropout, store):
        import torch
        from torch import nn

        class _M(nn.Module):
            def __init__(self):
                super().__init__()
                self.base = base
                self.A = nn.ParameterList([nn.Parameter(torch.randn(r, base.in_features) / base.in_features**0.5) for _ in range(experts)])
                self.B = nn.ParameterList([nn.Parameter(torch.zeros(base.out_features, r)) for _ in range(experts)])
                self.drop = nn.Dropout(dropout)
                self.scale = alpha / r

            def forward(self, x):
                y = self.base(x)
                weights, idx = store["gates"]  # [N, k], [N, k]
                flat = x.reshape(-1, x.shape[-1])
                out = torch.zeros(flat.shape[0], y.shape[-1], dtype=y.dtype)
                for e in range(len(self.A)):
                    tok, slot = torch.where(idx == e)
                    if tok.numel() == 0:
                        continue
                    h = self.drop(flat[tok]) @ self.A[e].T @ self.B[e].T
                    out.index_add_(0, tok, h * (weights[tok, slot, None] * self.scale))
                return y + out.reshape(y.shape)

        return _M()


def attach_moe(model, experts=4, k=2):
    import torch
    from torch import nn

    aux = []
    for layer in model.model.layers:
        for p in model.parameters():
            p.requires_grad_(False)
    routers = []
    for layer in model.model.layers:
        store = {}
        router = nn.Linear(512, experts, bias=False)
        nn.init.normal_(router.weight, std=0.02)
        routers.append(router)

        def pre_hook(mod, args, kwargs, router=router, store=store):
            h = kwargs.get("hidden_states", args[0] if args else None)
            logits = router(h.reshape(-1, h.shape[-1]))
            probs = torch.softmax(logits.float(), dim=-1)
            w, idx = torch.topk(probs, k, dim=-1)
            store["gates"] = (w / w.sum(-1, keepdim=True), idx)
            mask = torch.zeros_like(probs).scatter(1, idx, 1.0)
            aux.append(0.01 * experts * (mask.mean(0) * probs.mean(0)).sum())

        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for parent in (layer.self_attn, layer.mlp):
            for name in ALL:
                if hasattr(parent, name):
                    setattr(parent, name, MoeLoraLinear(getattr(parent, name), experts, 8, 16, 0.05, store))
    model.moe_routers = nn.ModuleList(routers)
    return model, aux


def worker(case, steps, warmup, threads):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, seq = 4, 256
    model = qwen2_small()
    aux = None
    if case == "S-moe":
        model, aux = attach_moe(model)
        params = [p for p in model.parameters() if p.requires_grad]
    elif case in ("S-qv", "S-all", "S-concurrent"):
        targets = ["q_proj", "v_proj"] if case == "S-qv" else ALL
        if case == "S-concurrent":
            targets = ALL
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    model.train()
    adapters = ["default"]
    if case == "S-concurrent":
        for name in ("t1", "t2"):
            model.add_adapter(name, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=ALL))
        adapters = ["default", "t1", "t2"]
    times = []
    for adapter in adapters:
        if case == "S-concurrent":
            model.set_adapter(adapter)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for step in range(warmup + steps):
            x = torch.randint(0, 8192, (batch, seq))
            t0 = time.perf_counter()
            if aux is not None:
                aux.clear()
            loss = model(input_ids=x, labels=x).loss
            if aux:
                loss = loss + sum(aux)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    tokens = batch * seq
    med = statistics.median(times)
    total = sum(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"impl": "pytorch+peft", "case": case, "threads": threads, "steps": steps,
           "tokens_per_step": tokens, "step_s_median": med,
           "step_s_min": min(times), "step_s_max": max(times),
           "tokens_per_s": tokens / med, "total_s": total, "peak_rss_mb": peak_mb,
           "torch": torch.__version__}
    print(json.dumps(out))


def run_json(cmd, env):
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--legora", default=str(ROOT / "target" / "release" / "legora"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.threads)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads))
    rows = []
    for case in args.cases.split(","):
        torch_res = run_json([sys.executable, __file__, "--worker", case, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--threads", str(args.threads)], env)
        print(json.dumps(torch_res), flush=True)
        leg = run_json([args.legora, "bench", "--case", case, "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--json"], env)
        print(json.dumps(leg), flush=True)
        rows.append((case, torch_res, leg))
    print()
    print(f"| case | PyTorch+PEFT tok/s | legora tok/s | ratio (legora/PyTorch) | PyTorch peak RSS MB | legora peak RSS MB | RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, t, l in rows:
        print(f"| {case} | {t['tokens_per_s']:.0f} | {l['tokens_per_s']:.0f} | {l['tokens_per_s'] / t['tokens_per_s']:.2f}x "
              f"| {t['peak_rss_mb']:.0f} | {l['peak_rss_mb']:.0f} | {l['peak_rss_mb'] / t['peak_rss_mb']:.2f} |")


if __name__ == "__main__":
    main()
