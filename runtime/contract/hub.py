"""Hugging Face hub ids wherever a checkpoint directory or a tokenizer is named: the one
place that tells a hub id from a path and turns it into a local snapshot directory, for
the checker (config.json, tokenizer files) and for the runtime (the weights, at run start).

Spelling, in a program:

    hf("Qwen/Qwen3-8B")            the default branch, `main`
    hf("Qwen/Qwen3-8B@v1.0")       a branch, tag or commit hash after `@`
    hf("hf://Qwen/Qwen3-8B@main")  always the hub, even where a local `Qwen/Qwen3-8B` exists

A string that names an existing local path (relative to the program file) is that path;
otherwise an `owner/name[@revision]` string is a hub id. The revision rides in the string
(as in huggingface_hub's own `hf://owner/name@revision` URLs) rather than in a separate
option, so one string says everything wherever a path is accepted, tokenizers included.
The checker keeps the id, written `hf://owner/name[@revision]`, in the IR and the
generated program: unambiguous where paths are relative strings too.

Resolution is `huggingface_hub.snapshot_download` into the standard cache, as
`transformers` does: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub; with
HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, only the cache is read. Both are read from
the environment at each call, not when huggingface_hub is imported. huggingface_hub is
imported only when a hub id is resolved, so checking a program without one never pays
for it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hf://"
DEFAULT_REVISION = "main"
CONFIG_FILES = ("config.json",)
TOKENIZER_MAIN = ("tokenizer.json", "tokenizer_config.json")  # a tokenizer has at least one of these
TOKENIZER_FILES = (*TOKENIZER_MAIN, "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "chat_template.jinja", "chat_template.json")
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a run loads from a checkpoint besides its weights: the files a local checkpoint
# directory has, so the snapshot can stand in for one (the tokenizer, exports).
CHECKPOINT_FILES = (*CONFIG_FILES, INDEX, "generation_config.json", *TOKENIZER_FILES)

# huggingface_hub's repo-id rule: parts of word characters, `-` and `.`, not starting or
# ending with `-` / `.`, no `--` / `..`, at most 96 characters each.
_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_ID = re.compile(rf"({_PART}/{_PART})(?:@([^\s@]+))?")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubError(Exception):
    """A hub id that cannot be resolved: the message says why, `hint` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.args[0]}; {self.hint}"


@dataclass(frozen=True)
class HubId:
    """A repository on the Hugging Face hub, at a revision (None: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return PREFIX + self.repo + (f"@{self.revision}" if self.revision else "")

    @property
    def label(self) -> str:
        """The id as people write it: `owner/name` or `owner/name@rev`."""
        return str(self)[len(PREFIX):]


def parse(text: str) -> HubId | None:
    """The hub id `text` spells (`owner/name[@rev]`, optionally `hf://`-prefixed), else None."""
    match = _ID.fullmatch(text[len(PREFIX):] if text.startswith(PREFIX) else text)
    if match is None or "--" in match.group(1) or ".." in match.group(1):
        return None
    return HubId(match.group(1), match.group(2))


def hub_id(text: str, base: Path) -> HubId | None:
    """The hub id a program's checkpoint or tokenizer string names, or None for a path:
    an `hf://` string is always an id (HubError if it spells none); another string is a
    path when it exists relative to `base` (the program's directory), else an id when it
    looks like one."""
    if text.startswith(PREFIX):
        return _as_id(text)
    try:
        if (base / text).exists():
            return None
    except (OSError, ValueError):  # too long, NUL bytes: not a path, and no id either
        return None
    return parse(text)


def is_hub(value) -> bool:
    """Whether a checkpoint or tokenizer value of the IR or a program spec is a hub id."""
    return isinstance(value, str) and value.startswith(PREFIX)


def settings() -> tuple[Path, bool]:
    """(the hub cache directory, whether offline), from the environment as it is now,
    by huggingface_hub's own rules."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    offline = any((env.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return Path(cache).expanduser(), offline


def resolve(ref: HubId | str, files=CONFIG_FILES, required=CONFIG_FILES) -> Path:
    """The local snapshot directory of `ref` holding those of `files` the repository has
    (downloaded into the cache when online, with huggingface_hub's progress bars),
    checked to hold every file of `required`. HubError otherwise."""
    ref = _as_id(ref)
    cache, offline = settings()
    snapshot = _snapshot(ref, tuple(files), str(cache), offline)
    missing = [f for f in required if not (snapshot / f).is_file()]
    if missing:
        where = "in the cache" if offline else "on the hub"
        raise HubError(f"hub id `{ref.label}` has no `{missing[0]}` {where} ({snapshot})", _hint(offline, cache))
    return snapshot


def resolve_checkpoint(ref: HubId | str) -> Path:
    """A checkpoint's snapshot with its weights: config.json, tokenizer files, and the
    safetensors files its index names (or the single model.safetensors)."""
    snapshot = resolve(ref, CHECKPOINT_FILES)
    try:
        weights = sorted(set(json.loads((snapshot / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
    except FileNotFoundError:
        weights = [SINGLE_FILE]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HubError(f"`{snapshot / INDEX}` is not a safetensors index ({e})", "the repository is damaged") from None
    return resolve(ref, (*CHECKPOINT_FILES, *weights), required=(*CONFIG_FILES, *weights))


def resolve_tokenizer(ref: HubId | str) -> Path:
    """A tokenizer's snapshot: its tokenizer files, at least tokenizer.json or
    tokenizer_config.json."""
    ref = _as_id(ref)
    snapshot = resolve(ref, TOKENIZER_FILES, ())
    if not any((snapshot / f).is_file() for f in TOKENIZER_MAIN):
        raise HubError(f"hub id `{ref.label}` has no tokenizer (no {' or '.join(TOKENIZER_MAIN)})",
                       "name a repository with a tokenizer, or a local tokenizer.json")
    return snapshot


def run_files(program) -> dict[str, str]:
    """What a run needs of each hub id a program spec names: "checkpoint" (weights and
    all) or "tokenizer" (its files only)."""
    needs: dict[str, str] = {}
    for model in program.models.values():
        if is_hub(model.checkpoint):
            needs[model.checkpoint] = "checkpoint"
    for dataset in program.datasets.values():
        if is_hub(dataset.tokenizer):
            needs.setdefault(dataset.tokenizer, "tokenizer")
    return needs


def fetch(program) -> dict[str, Path]:
    """Each hub id of a program spec -> its local snapshot, with what the run loads."""
    return {ref: resolve_checkpoint(ref) if need == "checkpoint" else resolve_tokenizer(ref)
            for ref, need in run_files(program).items()}


def _as_id(ref: HubId | str) -> HubId:
    parsed = parse(ref) if isinstance(ref, str) else ref
    if parsed is None:
        raise HubError(f"`{ref}` is not a Hugging Face hub id", "write it as owner/name or owner/name@revision")
    return parsed


def _hint(offline: bool, cache: Path) -> str:
    if offline:
        return (f"HF_HUB_OFFLINE is set, so only the cache {cache} was read: point HF_HOME (or HF_HUB_CACHE) at "
                "the cache that holds it, or unset HF_HUB_OFFLINE to download it; a local path is relative to "
                "the program file")
    return (f"looked in the cache {cache} (HF_HOME / HF_HUB_CACHE) and on the hub: check the id and the network, "
            "set HF_TOKEN for a private or gated repository, or HF_HUB_OFFLINE=1 to read only the cache; a local "
            "path is relative to the program file")


@functools.lru_cache(maxsize=64)
def _snapshot(ref: HubId, files: tuple[str, ...], cache: str, offline: bool) -> Path:
    """snapshot_download, once per process for the same question (errors are not kept)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (
            GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
        )
    except ImportError:
        raise HubError(f"hub id `{ref.label}` needs huggingface_hub", "pip install huggingface_hub") from None
    hint = _hint(offline, Path(cache))
    try:
        return Path(snapshot_download(ref.repo, revision=ref.revision or DEFAULT_REVISION, cache_dir=cache,
                                      allow_patterns=list(files), local_files_only=offline))
    except GatedRepoError:
        problem = "is a gated repository: accept its terms on huggingface.co and set HF_TOKEN"
    except RepositoryNotFoundError:
        problem = "is no repository on the Hugging Face hub that this token can read"
    except RevisionNotFoundError:
        problem = f"has no revision `{ref.revision or DEFAULT_REVISION}`"
    except LocalEntryNotFoundError:
        problem = ("is not in the Hugging Face cache" if offline
                   else "is not in the Hugging Face cache, and the hub could not be reached")
    except (HfHubHTTPError, OSError, ValueError) as e:
        problem = f"could not be resolved: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    raise HubError(f"hub id `{ref.label}` {problem}", hint)
