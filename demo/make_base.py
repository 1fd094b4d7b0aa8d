"""Make the demo's base model: a tiny Llama pretrained on a bundled general corpus.

    ~/.cache/legora-venv/bin/python demo/make_base.py

This is the provenance of everything under demo/base/ (committed, < 5 MB), so the demo
needs no download and no Python:

1. writes demo/corpus.txt: a deterministic general-English corpus (everyday topics made
   from templates x vocabularies x numbers, and sentences that quote and repeat a phrase,
   so the model learns to copy from its context; no task formats, no answers to the
   plugin tasks);
2. trains a byte-level BPE tokenizer (vocab 512) on the corpus plus the plugins' sample
   *training* texts, so that domain words tokenize sensibly;
3. pretrains LlamaForCausalLM (hidden 128, 4 layers, 4 heads / 2 KV heads, tied embeddings)
   on the corpus with a next-token loss (1500 steps of 16 x 256 tokens), and saves it with
   save_pretrained (float32).

The model knows English-ish text, but has never seen the medical, finance or game-NPC
task formats: what the LoRA experts learn in the demo is theirs.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo" / "base"
SEED = 20261127

PEOPLE = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
PLACES = ["the market", "the park", "the library", "the station", "the river", "the office",
          "the school", "the harbor", "the garden", "the museum", "the bakery", "the hill"]
THINGS = ["a book", "some bread", "a lamp", "a map", "two apples", "a new coat", "a bicycle",
          "a letter", "a cup of tea", "a small table", "fresh flowers", "a warm scarf"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "foggy", "bright", "stormy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
VERBS = ["walked to", "drove to", "visited", "cleaned", "painted", "left", "returned to"]
FEELINGS = ["happy", "tired", "calm", "curious", "busy", "glad", "worried", "proud"]
TOPICS = {
    "health": ["sleep", "water", "exercise", "a doctor", "rest", "fresh fruit", "a short walk"],
    "money": ["a budget", "savings", "a bank", "a receipt", "prices", "a payment", "a loan"],
    "stories": ["a knight", "a dragon", "a castle", "a village", "a journey", "a quiet inn"],
}
TEMPLATES = [
    "{p} {v} {pl} on {d}. It was {w}, and {p} felt {f}.",
    "On {d} the weather was {w}. {p} bought {t} at {pl}.",
    "{p} and {q} met at {pl}. They talked about {x} for {n} minutes.",
    "It is good to think about {x}. {p} says that {x} matters every day.",
    "There were {n} people at {pl} today. Most of them looked {f}.",
    "{p} wrote a note: remember {t} and {x} before {d}.",
    "In the story, {x} waited near {pl} for {n} days until the sky was {w}.",
    "{q} asked {p} a question about {x}. {p} answered slowly and felt {f}.",
    "The price of {t} was {n} coins at {pl}, so {p} paid and went home.",
    "Every {d}, {p} spends {n} minutes on {x}.",
]


# Quoting and repeating: general English that asks the model to copy a phrase it read
# earlier in the text (what people and signs say), so that the base learns to look back
# and copy — a skill every later task leans on — without seeing any task format.
WORDS = ["bright", "river", "stone", "quiet", "golden", "winter", "apple", "silver", "road",
         "happy", "green", "thunder", "little", "garden", "morning", "candle", "north",
         "gentle", "copper", "forest", "velvet", "storm", "honey", "lantern", "brave", "salt"]
QUOTE_TEMPLATES = [
    "{p} always says \"{s}\". When {q} came to {pl}, {p} smiled and said: \"{s}\"",
    "The sign at {pl} reads \"{s}\". {q} read the sign aloud: \"{s}\"",
    "{p} taught {q} a saying: \"{s}\". On {d}, {q} repeated it: \"{s}\"",
    "Every time {p} is {f}, {p} says \"{s}\". Today {p} was {f} and said \"{s}\"",
]


def make_corpus(n_lines=9000, n_quotes=3000):
    rng = random.Random(SEED)
    lines = []
    for _ in range(n_lines):
        topic = rng.choice(list(TOPICS))
        lines.append(rng.choice(TEMPLATES).format(
            p=rng.choice(PEOPLE), q=rng.choice(PEOPLE), v=rng.choice(VERBS),
            pl=rng.choice(PLACES), t=rng.choice(THINGS), w=rng.choice(WEATHER),
            d=rng.choice(DAYS), f=rng.choice(FEELINGS), x=rng.choice(TOPICS[topic]),
            n=rng.randint(2, 90)))
    for _ in range(n_quotes):
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(QUOTE_TEMPLATES).format(
            p=rng.choice(PEOPLE), q=rng.choice(PEOPLE), pl=rng.choice(PLACES),
            d=rng.choice(DAYS), f=rng.choice(FEELINGS), s=phrase.capitalize() + "!"))
    return lines


def plugin_texts():
    """Raw text of the plugins' training files (tokenizer coverage only)."""
    texts = []
    for path in sorted((ROOT / "plugins").glob("*/data/**/*")):
        if path.is_file() and "test" not in path.name and path.suffix in {".json", ".jsonl", ".csv", ".txt"}:
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def train_tokenizer(corpus_lines):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines + plugin_texts(), trainer)
    return tok


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    lines = make_corpus()
    (ROOT / "demo" / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer(lines)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None)
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(OUT)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=352,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    ids = []
    for line in lines:
        ids.extend(tok.encode(line).ids + [eos])
    data = torch.tensor(ids, dtype=torch.long)
    # 256 positions: the demo's dialogue rows are that long
    seq, batch, steps = 256, 16, 1500
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval()
    model.save_pretrained(OUT, safe_serialization=True)
    model.generation_config.save_pretrained(OUT)
    info = {"tokens": len(ids), "steps": steps, "final_loss": round(loss.item(), 4),
            "params": sum(p.numel() for p in model.parameters())}
    (OUT / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(info)


if __name__ == "__main__":
    main()
