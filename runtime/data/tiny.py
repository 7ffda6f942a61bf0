"""The bundled tiny task: a character vocabulary and a verifiable counting pattern.

A prompt is a short string of letters and digits that ends with a digit; the right
response counts upward from that digit, wrapping 9 -> 0 ("ab3k7" -> "89012…"). It is
small enough for a randomly initialised 2-layer model to learn by policy gradient on a
CPU in minutes, and the reward is checkable from token ids alone, so the rule reward
(`pattern_reward`) needs no tokenizer at run time. The id of every token is fixed
here; `scripts/make_tiny_task.py` builds `data/tiny/tokenizer.json` from this table.
"""

from __future__ import annotations

import random
import string

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
DIGITS = tuple(string.digits)
LETTERS = tuple(string.ascii_lowercase)
VOCAB: tuple[str, ...] = SPECIALS + DIGITS + LETTERS
TOKEN_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID = (TOKEN_ID[t] for t in SPECIALS)
DIGIT_IDS: tuple[int, ...] = tuple(TOKEN_ID[d] for d in DIGITS)
# The model's vocabulary: the tokenizer's size rounded up to a multiple of 8.
MODEL_VOCAB = -(-len(VOCAB) // 8) * 8

PROMPT_MIN_LEN, PROMPT_MAX_LEN = 2, 6
ANSWER_LEN = 8  # digits in the reference continuation of the SFT / pair data


def next_digit_id(token_id: int) -> int | None:
    """The id of the digit after `token_id` (9 wraps to 0), or None if it is no digit."""
    if token_id not in DIGIT_IDS:
        return None
    return DIGIT_IDS[(DIGIT_IDS.index(token_id) + 1) % 10]


def continuation(prompt: str, n: int = ANSWER_LEN) -> str:
    """The correct response to `prompt`: `n` digits counting up from its last digit."""
    start = int(prompt[-1])
    return "".join(str((start + 1 + k) % 10) for k in range(n))


def wrong_continuation(prompt: str, rng: random.Random, n: int = ANSWER_LEN) -> str:
    """A plausible wrong response (counting down, or random digits), for rejected pairs."""
    start = int(prompt[-1])
    if rng.random() < 0.5:
        return "".join(str((start - 1 - k) % 10) for k in range(n))
    out = "".join(rng.choice(DIGITS) for _ in range(n))
    return out if out != continuation(prompt, n) else continuation(prompt, n)[::-1]


def random_prompt(rng: random.Random) -> str:
    """A prompt: random letters and digits, always ending with a digit."""
    body = rng.choices(LETTERS + DIGITS, k=rng.randint(PROMPT_MIN_LEN, PROMPT_MAX_LEN) - 1)
    return "".join(body) + rng.choice(DIGITS)
