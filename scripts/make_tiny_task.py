"""Regenerate the bundled tiny task in data/tiny/ (deterministic: same files every run).

    python scripts/make_tiny_task.py [--out data/tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlhfc_runtime.data import tiny
from rlhfc_runtime.data.tokenizer import char_tokenizer

N_PROMPTS, N_PAIRS, N_SFT = 2048, 1024, 1024


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def make(out: Path, seed: int) -> None:
    """Write prompts.jsonl, pairs.jsonl, sft.jsonl, tokenizer.json and tokenizer_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts = [tiny.random_prompt(rng) for _ in range(N_PROMPTS)]
    _write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in prompts])
    pair_prompts = [tiny.random_prompt(rng) for _ in range(N_PAIRS)]
    _write_jsonl(out / "pairs.jsonl", [
        {"prompt": p, "chosen": tiny.continuation(p), "rejected": tiny.wrong_continuation(p, rng)}
        for p in pair_prompts])
    sft_prompts = [tiny.random_prompt(rng) for _ in range(N_SFT)]
    _write_jsonl(out / "sft.jsonl", [{"prompt": p, "response": tiny.continuation(p)} for p in sft_prompts])
    tokenizer = char_tokenizer(list(tiny.VOCAB), tiny.PAD, tiny.BOS, tiny.EOS)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": tiny.PAD,
              "bos_token": tiny.BOS, "eos_token": tiny.EOS, "model_max_length": 128,
              "padding_side": "left"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make(args.out, args.seed)


if __name__ == "__main__":
    main()
