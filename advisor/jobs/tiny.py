"""A tiny local model, tokenizer and learnable dataset: the service end to end without a download.

Why it exists: tests, the overhead benchmark and the docs' walkthrough need a real model directory
(config.json + safetensors + tokenizer with a chat template) that trains in seconds on a CPU. The
architecture is a real Llama config scaled down; the weights are random; the tokenizer is a
word-level one trained here with ``tokenizers`` on the dataset's own words.

    python -m advisor.jobs.tiny OUT_DIR     # writes OUT_DIR/model/ and OUT_DIR/train.jsonl (+ valid.jsonl)

The dataset is a counting pattern ("count from 7" -> "8 9 10 11 12"), so the loss visibly falls and a
trained adapter visibly changes the model's output. torch/transformers are imported inside.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
MAX_NUMBER = 120


def counting_examples(n: int, seed: int = 0, fmt: str = "chat", length: int = 5) -> list[dict[str, Any]]:
    """`n` examples of the counting pattern, in chat or prompt/completion format."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(0, MAX_NUMBER - length)
        answer = " ".join(str(k + i + 1) for i in range(length))
        if fmt == "chat":
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "you count"},
                        {"role": "user", "content": f"count from {k}"},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        else:
            out.append({"prompt": f"count from {k} :", "completion": " " + answer})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tokenizer(chat_template: bool = True) -> Any:
    """A word-level tokenizer over the pattern's words, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["count", "from", "you", ":", "System:", "User:", "Assistant:"] + [str(i) for i in range(MAX_NUMBER + 1)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIAL))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
        # 10x Llama's 0.02: with frozen random embeddings and lm_head, a LoRA on such a small model
        # only moves the loss visibly in a few steps when the head's logits are not all near zero
        initializer_range=0.2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_model(path: Path, seed: int = 0, chat_template: bool = True, **config: Any) -> Path:
    """config.json + model.safetensors (random, fp32) + tokenizer files in `path`."""
    from advisor.stack.build import save_random_model

    tok = build_tokenizer(chat_template)
    cfg = tiny_llama_config(len(tok), **config)
    save_random_model(cfg, path, seed)
    tok.save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advisor.jobs.tiny", description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--examples", type=int, default=64)
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tiny_model(out / "model")
    write_jsonl(out / "train.jsonl", counting_examples(args.examples, seed=0))
    write_jsonl(out / "valid.jsonl", counting_examples(max(4, args.examples // 8), seed=1))
    print(f"wrote {out / 'model'}, {out / 'train.jsonl'}, {out / 'valid.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
