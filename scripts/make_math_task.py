"""Write the bundled arithmetic task `data/math/` (no downloads; deterministic):

- `train.jsonl`: 300 rows {"question": "What is 3+4?", "answer": "7", "a": 3, "b": 4}
- `ckpt/`: a small random Qwen2-shaped Hugging Face checkpoint (config.json,
  model.safetensors) with its tokenizer (tokenizer.json, tokenizer_config.json holding a
  ChatML chat template): characters, plus the ChatML markers as tokens.

    python scripts/make_math_task.py [--out data/math]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ROLES = ["system", "user", "assistant"]
CHARS = list("0123456789+-*/=?.,:;!'()\" \n" + string.ascii_letters)
VOCAB = 96  # the model's: room above the tokenizer's 86 tokens


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(10)
        b = rng.randrange(10 - a)  # single-digit sums: a random 2-layer model can learn them in minutes
        out.append({"question": f"What is {a}+{b}?", "answer": str(a + b), "a": a, "b": b})
    return out


def tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ROLES + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(ROLES)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(path))
    config = path / "tokenizer_config.json"  # not the model type's own tokenizer class
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"},
                                 indent=2) + "\n")
    return fast


def checkpoint(path: Path, vocab: int) -> None:
    from rlhfc_runtime.checkpoint import tiny_config, write_random_checkpoint

    cfg = tiny_config(model_type="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    write_random_checkpoint(path, cfg, seed=7)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "math")
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows, seed=0)))
    tok = tokenizer(args.out / "ckpt")
    checkpoint(args.out / "ckpt", vocab=VOCAB)
    assert len(tok) <= VOCAB, len(tok)
    print(f"wrote {args.out}: {args.rows} rows, tokenizer of {len(tok)} tokens, Qwen2 checkpoint")


if __name__ == "__main__":
    main()
