"""What a resume must agree on with its checkpoint, as plain JSON: the program's
fingerprint, the manifest that records it, and the comparison that refuses a changed
shape, head, dataset, call set or seed and applies anything else.

Pure Python, no torch: `rlhfc run --resume` refuses a changed program here, before it
writes or starts anything; the runtime compares again when it restores (`ckpt_store`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rlhfc_runtime.contract.program import Program
from rlhfc_runtime.contract.rundir import RunDirError, step_dirs

FORMAT, VERSION = "rlhfc-checkpoint", 2  # 2: sharded weights and moments
MANIFEST = "manifest.json"
_MODEL_KEYS = ("kind", "shape", "head", "trainable", "checkpoint", "rule", "init_seed")
FIXED_RUN_KEYS = ("dataflow", "seed")  # a resume cannot change these; other run keys it applies


def resolve_paths(program: Program, base: Path) -> Program:
    """The program with its file paths (relative to the generated file) made absolute,
    and its hub ids (`hf://owner/name[@rev]`, kept as the user wrote them in the
    generated file) replaced by their local snapshot directories, the weights downloaded
    here when online (`contract.hub`; HubError when they cannot be resolved).

    Hub ids are resolved once, at run start, rather than where each file is read: the
    launcher resolves them before it spawns the workers, so a download happens once with
    its progress bar on the launcher's terminal, and every later reader (checkpoint
    loading, tokenizer, export, resume) sees the plain directory it always has. The
    snapshot directory names the commit, so a resume refuses a checkpoint whose hub
    weights moved to another commit, as it refuses a moved checkpoint directory."""
    from rlhfc_runtime.contract import hub

    local = {ref: str(path) for ref, path in hub.fetch(program).items()}

    def fix(path):
        if path is None:
            return None
        return local[path] if path in local else str((base / path).resolve())

    return replace(
        program,
        source=fix(program.source),
        models={n: replace(m, checkpoint=fix(m.checkpoint), functions=tuple((fix(p), fn, w) for p, fn, w in m.functions))
                for n, m in program.models.items()},
        datasets={n: replace(d, path=fix(d.path), tokenizer=fix(d.tokenizer)) for n, d in program.datasets.items()},
    )


def fingerprint(program: Program) -> dict:
    """What a checkpoint must agree on with the program that resumes it, as its manifest
    stores it (JSON: a shape's tuples are lists there too)."""
    return _fingerprint(program.as_json())


def _fingerprint(program: dict) -> dict:
    return json.loads(json.dumps({
        "models": {n: {k: m.get(k) for k in _MODEL_KEYS} | {"optimizer": (m.get("optimizer") or {}).get("name")}
                   for n, m in sorted(program["models"].items())},
        "datasets": program["datasets"],
        "calls": sorted(program.get("estimates", {})),
        "run": {k: program["run"].get(k) for k in FIXED_RUN_KEYS},
    }))


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            raise RunDirError(f"{path} is missing or not a regular file")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise RunDirError(f"{path}: unreadable manifest ({type(err).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise RunDirError(f"{path}: not an rlhfc checkpoint manifest of version {VERSION}")
    return manifest


def compare(manifest: dict, program: Program) -> tuple[list[str], list[str]]:
    """(what changed that a resume cannot continue with, what changed that it applies)."""
    refuse, apply = [], []
    program = program.as_json()
    old, new = manifest["fingerprint"], _fingerprint(program)
    for name in sorted(set(old["models"]) | set(new["models"])):
        a, b = old["models"].get(name), new["models"].get(name)
        if a is None or b is None:
            refuse.append(f"model {name} was {'added' if a is None else 'removed'}")
            continue
        refuse += [f"model {name}: {k} {_short(x)} -> {_short(y)}" for k, x, y in _differences(a, b)]
    for name in sorted(set(old["datasets"]) | set(new["datasets"])):
        if old["datasets"].get(name) != new["datasets"].get(name):
            refuse.append(f"dataset {name} changed")
    if old["calls"] != new["calls"]:
        refuse.append(f"the dataflow's calls {', '.join(old['calls'])} -> {', '.join(new['calls'])}")
    refuse += [f"run {k} {_short(old['run'].get(k))} -> {_short(v)}" for k, v in new["run"].items()
               if old["run"].get(k) != v]
    was = manifest.get("program", {})
    for name, spec in program["models"].items():
        before = (was.get("models", {}).get(name) or {}).get("optimizer") or {}
        for k, v in (spec.get("optimizer") or {}).items():
            if before.get(k) != v and k != "name":
                apply.append(f"{name} {k} {_short(before.get(k))} -> {_short(v)}")
    before = was.get("run", {})
    apply += [f"{k} {_short(before.get(k))} -> {_short(v)}" for k, v in program["run"].items()
              if k not in FIXED_RUN_KEYS and before.get(k) != v]
    return refuse, apply


def refusal(directory: Path, refuse: list[str]) -> str:
    """The message of a resume refused for `refuse` (changes from `compare`): every change,
    and what to do instead (never the same resume again)."""
    listed = "\n".join(f"  - {r}" for r in refuse[:12]) + (f"\n  - … {len(refuse) - 12} more" if len(refuse) > 12 else "")
    return (f"cannot resume {directory}: the program changed in ways the checkpoint cannot follow:\n"
            f"{listed}\nrevert these changes, or start over with --overwrite")


def check_resumable(out: Path, program: dict) -> None:
    """RunDirError listing what changed when `program` cannot continue the newest
    checkpoint of OUT whose manifest reads (checksums are the runtime's to verify)."""
    for directory in step_dirs(out):
        try:
            manifest = read_manifest(directory)
        except RunDirError:
            continue
        try:
            refuse, _ = compare(manifest, program)
        except (KeyError, TypeError, AttributeError):
            raise RunDirError(f"{directory / MANIFEST}: a manifest without the program it was written by") from None
        if refuse:
            raise RunDirError(refusal(directory, refuse))
        return


def _differences(a: dict, b: dict, prefix: str = ""):
    """(dotted key, old, new) for every leaf that differs."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            yield f"{prefix}{k}", x, y


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
