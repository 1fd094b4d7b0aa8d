"""Check that legora's expert folders are real PEFT adapters.

    ~/.cache/legora-venv/bin/python demo/check_peft.py [--run out/demo] [--base demo/base]

For every task of a finished run, loads the base with transformers, the expert folder
`<run>/experts/<task>/` with `peft.PeftModel.from_pretrained`, recomputes the validation
loss on exactly the tokens legora used (`<run>/data/<task>.val.jsonl`: input_ids and
labels with -100 on prompt tokens), and compares it with the loss legora reports for
that expert (`report.json`, tasks[].models.expert.val_loss). Exit code 1 if any differs
by more than 1e-3.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def val_loss(model, path):
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = labels[:, 1:]
            mask = target != -100
            picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            nll -= picked[mask].sum().item()
            count += int(mask.sum())
    return nll / max(count, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--base", default=str(ROOT / "demo" / "base"))
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    failed = False
    for task in report["tasks"]:
        name = task["task"]
        want = task["models"]["expert"]["val_loss"]
        base = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run / "experts" / name).eval()
        got = val_loss(model, run / "data" / f"{name}.val.jsonl")
        ok = abs(got - want) <= args.tol
        failed |= not ok
        print(f"{name:>10}: PEFT val loss {got:.6f}  legora {want:.6f}  |diff| {abs(got - want):.2e}  {'ok' if ok else 'MISMATCH'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
