"""Make a small PEFT LoRA adapter (random A and B, so it changes outputs) on a model
folder, with transformers + peft, for trying `legora serve`:

    python bench/make_peft_adapter.py demo/base /tmp/adapter-a --seed 1
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--targets", default="q_proj,v_proj")
args = ap.parse_args()
torch.manual_seed(args.seed)
model = AutoModelForCausalLM.from_pretrained(args.model)
cfg = LoraConfig(r=4, lora_alpha=8, target_modules=args.targets.split(","),
                 init_lora_weights=False)
get_peft_model(model, cfg).save_pretrained(args.out)
print("wrote", args.out)
