"""Datasets as batches with a seeded, resumable sampler: prompts, preference pairs, SFT.

Every loader yields global batches (dicts of tensors, layout as in
`rlhfc_runtime.algorithms.batch`) and has a `state_dict()` holding the sampler's
position, so a resumed run sees exactly the batches it would have seen. Rows are read
on demand from a `sources` row source (JSONL, Parquet, `datasets`); the indices of the
last batch stay on the loader, so a row's other fields (its columns) can be looked up
by the batch row, on any rank, without moving them with the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from rlhfc_runtime.algorithms.batch import build_sequences
from rlhfc_runtime.data.sources import open_rows


class Sampler:
    """Endless, deterministic index stream over `n` items: a fresh permutation per
    epoch seeded by (seed, epoch), so the position alone fixes everything after it."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        """This epoch's order, as a tensor: only the indices taken become Python ints
        (a list of a million-row dataset's whole order is ~35 MB per process)."""
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=generator)

    def take(self, k: int) -> list[int]:
        """The next `k` indices, moving on to the next epoch's permutation as needed."""
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            step = min(k - len(out), self.n - self.position)
            out += order[self.position:self.position + step].tolist()
            self.position += step
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "n": self.n}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at a saved position; refuses a state taken on different data."""
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['n']} items with seed {state['seed']}, "
                             f"this dataset has {self.n} items with seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as left-padded ids and mask [B, max(width, longest)]: generation
    appends on the right, so every prompt must end in the same column."""
    width = max(width, *(len(r) for r in rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int = 0) -> torch.Tensor:
    """Token lists as right-padded ids [B, max(width, longest)]."""
    width = max(width, *(len(r) for r in rows))
    return torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


class JsonlLoader:
    """A dataset as batches. `fields` maps roles to row keys:
    {"prompt"} → prompt batches (left-padded `input_ids`, `attention_mask`);
    {"prompt", "chosen", "rejected"} → pair batches [B, 2, T];
    {"prompt", "response"} → SFT batches [B, T] with the response as `response_mask`.
    Prompts keep their last `max_len` tokens; responses their first `max_len`, plus eos.
    Batches are padded to those widths (prompts to `max_len`, responses to `max_len` + 1),
    the lengths the plan priced: every step runs the shapes the compiler planned.
    `chat` wraps the prompt in the tokenizer's chat template as a user message (after a
    `system` message if given), with the generation prompt; `columns` are the row keys
    reward functions and samples see."""

    def __init__(self, path: str | Path, tokenizer, fields: Mapping[str, str],
                 max_len: int, seed: int = 0, shuffle: bool = True, fmt: str = "jsonl",
                 chat: bool = False, system: str | None = None, columns: Sequence[str] | None = None):
        roles = set(fields)
        if roles not in ({"prompt"}, {"prompt", "chosen", "rejected"}, {"prompt", "response"}):
            raise ValueError(f"dataset fields {sorted(roles)}: expected prompt, "
                             f"prompt/chosen/rejected, or prompt/response")
        self.path, self.tokenizer, self.fields, self.max_len = Path(path), tokenizer, dict(fields), max_len
        self.chat, self.system = chat, system
        self.rows = open_rows(path, fmt, list(fields.values()))
        used = set(self.fields.values())
        self.columns = list(columns) if columns is not None else [k for k in self.rows[0] if k not in used]
        self.sampler = Sampler(len(self.rows), seed, shuffle)
        self.last: list[int] = []  # dataset row of each row of the last batch

    def prompt_text(self, text: str) -> str:
        """What the model is prompted with: the text, or the chat-templated conversation."""
        if not self.chat:
            return text
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _prompt_ids(self, text: str) -> list[int]:
        if self.chat:  # the template writes its own special tokens
            return self.tokenizer(self.prompt_text(text), add_special_tokens=False)["input_ids"][-self.max_len:]
        return self.tokenizer(text)["input_ids"][-self.max_len:]

    def _response_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.max_len]
        return ids + [self.tokenizer.eos_token_id]

    def _sequences(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prompt_ids, prompt_mask = left_pad([self._prompt_ids(p) for p in prompts], pad, self.max_len)
        response_ids = right_pad([self._response_ids(r) for r in responses], pad, self.max_len + 1)
        return build_sequences(prompt_ids, prompt_mask, response_ids, eos, pad)

    def row_fields(self, index: int) -> tuple[str, dict]:
        """(prompt text, columns) of dataset row `index`."""
        row = self.rows[index]
        return row[self.fields["prompt"]], {c: row.get(c) for c in self.columns}

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The next `batch_size` rows as tensors."""
        self.last = self.sampler.take(batch_size)
        rows = [self.rows[i] for i in self.last]
        prompts = [r[self.fields["prompt"]] for r in rows]
        if "chosen" in self.fields:
            n = len(rows)
            pairs = self._sequences(prompts * 2, [r[self.fields["chosen"]] for r in rows]
                                    + [r[self.fields["rejected"]] for r in rows])
            return {k: torch.stack([v[:n], v[n:]], dim=1) for k, v in pairs.items()}
        if "response" in self.fields:
            return self._sequences(prompts, [r[self.fields["response"]] for r in rows])
        ids, mask = left_pad([self._prompt_ids(p) for p in prompts], self.tokenizer.pad_token_id, self.max_len)
        return {"input_ids": ids, "attention_mask": mask}

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)
