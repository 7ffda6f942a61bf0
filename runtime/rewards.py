"""Reward calls: registered rules and the user's Python functions, and the rows that
samples.jsonl shows (decoded, as token ids, with the generating policy's log-probs).

A Python reward has TRL's signature, `f(prompts, completions, **columns) -> list[float]`:
`prompts` are the dataset's prompt texts (before any chat template), `completions` the
decoded responses, and every other field of the prompt rows is a keyword argument, one
list per field aligned with the completions (a prompt's group samples repeat its row).
Several functions are summed with their weights, and so are score keys: data keys the
call takes after `seq`, such as a reward model's score; each is logged as a component.

The user's file is imported here, in the worker, at the first reward call, never by the
compiler. One rank of each model-parallel group (tp x pp) scores its dp rank's rows and
sends the scores to the others, so a function runs once per row. An exception in it, or
a result of the wrong length or type, stops the run with the function's FILE:LINE.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import traceback
from pathlib import Path

import torch

SAMPLES_PER_CALL = 4  # decoded rows written to samples.jsonl per reward call and step


class RewardError(RuntimeError):
    """A located failure of the user's reward code; shown without a worker traceback."""

    located = True


_FUNCTIONS: dict[tuple[str, str], object] = {}


def load_function(path: str, name: str):
    """`name` from the Python file `path`, imported once per process."""
    if (path, name) not in _FUNCTIONS:
        module_name = "rlhfc_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise RewardError(f"{path}:1: cannot import the reward file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's code: any failure is theirs to see
            raise RewardError(f"{_where(e, path)}: importing `{Path(path).name}` raised "
                              f"{type(e).__name__}: {e}") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise RewardError(f"{path}:1: `{name}` is not a function of `{Path(path).name}`")
        _FUNCTIONS[(path, name)] = fn
    return _FUNCTIONS[(path, name)]


def _where(error: BaseException, path: str) -> str:
    """FILE:LINE of the innermost frame in the user's file (or the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    mine = [f for f in frames if Path(f.filename).resolve() == Path(path).resolve()] or frames
    return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else f"{path}:1"


def call_function(path: str, name: str, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
    """One function's scores for the rows, checked: a list of len(completions) numbers."""
    fn = load_function(path, name)
    try:
        out = fn(prompts, completions, **columns)
    except Exception as e:  # noqa: BLE001
        raise RewardError(f"{_where(e, path)}: reward `{name}` raised {type(e).__name__}: {e}") from None
    try:
        scores = [float(v) for v in out]
    except (TypeError, ValueError):
        raise RewardError(f"{path}:1: reward `{name}` must return a list of numbers, "
                          f"got {type(out).__name__}") from None
    if len(scores) != len(completions) or any(math.isnan(s) for s in scores):
        problem = f"{len(scores)} scores for {len(completions)} completions" if len(scores) != len(completions) \
            else "a NaN score"
        raise RewardError(f"{path}:1: reward `{name}` returned {problem}")
    return scores


def python_scores(functions, prompts: list[str], completions: list[str], columns: dict,
                  score_keys=(), keyed: dict | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per row, each component's scores) of `functions` = [(path, name,
    weight)], called, and `score_keys` = [(key, weight)], whose scores `keyed` holds
    (a reward model's, one per row)."""
    components = {name: call_function(path, name, prompts, completions, columns) for path, name, _ in functions}
    components.update({key: list(keyed[key]) for key, _ in score_keys})
    weights = [(name, w) for _, name, w in functions] + [(key, w) for key, w in score_keys]
    total = [sum(w * components[name][i] for name, w in weights) for i in range(len(completions))]
    return total, components


def sample_rows(total: int) -> list[int]:
    """The rows of a call of `total` rows that samples.jsonl shows: SAMPLES_PER_CALL of
    them spread evenly over the call (so over its groups), by global row index: the same
    rows under every plan, whichever rank holds them."""
    shown = min(SAMPLES_PER_CALL, total)
    return [i * total // shown for i in range(shown)]


def row_tokens(seq: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each row of a `seq` batch, without padding: the
    prompt the model saw, and the generated tokens up to and including an EOS."""
    ids, mask, resp = seq["input_ids"].cpu(), seq["attention_mask"].cpu(), seq["response_mask"].cpu()
    return [(ids[row][(mask[row] == 1) & (resp[row] == 0)].tolist(), ids[row][resp[row] == 1].tolist())
            for row in range(ids.shape[0])]


def decode_rows(tokenizer, tokens: list[tuple[list[int], list[int]]]) -> tuple[list[str], list[str]]:
    """(templated prompt text, completion text) of each row's `row_tokens`."""
    return ([tokenizer.decode(prompt, skip_special_tokens=False) for prompt, _ in tokens],
            [tokenizer.decode(answer, skip_special_tokens=True) for _, answer in tokens])


def shown_logprobs(seq: dict, logp: torch.Tensor, first: int, total: int) -> list[dict]:
    """{"row", "logprobs"} of the rows of a generated batch that samples.jsonl shows:
    `seq` and its aligned `logp` [B, T] (the generate call's) hold global rows `first`…
    of `total`; `logprobs` are the generating policy's, one per completion token."""
    resp, logp = seq["response_mask"].cpu() == 1, logp.cpu()
    return [{"row": r, "logprobs": logp[r - first][resp[r - first]].tolist()}
            for r in sample_rows(total) if first <= r < first + resp.shape[0]]


def with_logprobs(samples: list[dict], generated: list[dict]) -> list[dict]:
    """Every rank's sample rows in call and row order, each with the `logprobs` and the
    `policy_version` that the generate call which made its sequences (`seq_key`, same
    step) recorded for its row (`generated`: {"step", "key", "row", "logprobs",
    "policy_version"}), or None where no generate call made them."""
    found = {(g["step"], g["key"], g["row"]): g for g in generated}
    order = list(dict.fromkeys(s["call"] for s in samples))
    rows = []
    for sample in sorted(samples, key=lambda s: (order.index(s["call"]), s["row"])):
        row = {k: v for k, v in sample.items() if k != "seq_key"}
        made = found.get((sample["step"], sample["seq_key"], sample["row"]), {})
        rows.append({**row, "logprobs": made.get("logprobs"), "policy_version": made.get("policy_version")})
    return rows


def score_rows(spec, seq: dict, loader, dataset_rows: list[int], rule_scores, keyed: dict,
               shown: dict[int, int] | None = None) -> tuple[list[float], dict, list]:
    """(scores, component means, sample rows) of this rank's rows of `seq`; `dataset_rows`
    is the dataset row of each; `rule_scores()` scores a registered rule's rows; `keyed`
    holds the rows' score keys (key -> one number per row). `shown` maps the local rows
    that samples.jsonl shows to their global rows (None: `sample_rows` of these rows)."""
    tokens = row_tokens(seq)
    prompts, completions = decode_rows(loader.tokenizer, tokens)
    texts, columns = [], {c: [] for c in loader.columns}
    for index in dataset_rows:
        text, cols = loader.row_fields(index)
        texts.append(text)
        for c in loader.columns:
            columns[c].append(cols[c])
    if spec.functions or spec.score_keys:
        scores, components = python_scores(spec.functions, texts, completions, columns, spec.score_keys, keyed)
    else:
        scores, components = [float(v) for v in rule_scores()], {}
    samples = []
    for i, row in (shown if shown is not None else {r: r for r in sample_rows(len(scores))}).items():
        samples.append({"row": row, "prompt": prompts[i], "completion": completions[i], "reward": scores[i],
                        **{f"reward/{k}": v[i] for k, v in components.items()},
                        **{k: _plain(v[i]) for k, v in columns.items()},
                        "prompt_ids": tokens[i][0], "completion_ids": tokens[i][1]})
    means = {f"reward/{k}": sum(v) / len(v) for k, v in components.items() if v}
    return scores, means, samples


def _plain(value):
    """A column value as JSON can hold it (numbers, strings, lists; others as text)."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


def as_tensor(scores: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(scores, dtype=torch.float32, device=like.device)
