"""Checkpoints a run can trust: versioned step directories, no pickle, layout-free.

    OUT/checkpoint/step-000010/
        manifest.json             step, program fingerprint and hash, layouts, world size,
                                  loader positions, per-file sha256 and size, and for each
                                  trainable model the interval of the full tensor that
                                  every key of every shard file holds (`shards`)
        MODEL.rank{R}.safetensors the shards rank R writes (`shard_io`): `weight/NAME`,
                                  `exp_avg/NAME`, `exp_avg_sq/NAME`
        rank{R}.json / rank{R}.safetensors   that rank's Python / torch RNG states
    OUT/checkpoint/latest         the step of the newest complete directory

A save writes into `step-N.partial`: every rank streams its own shards (each distinct
interval once, spread over the holders: `shard_plan.write_plan`), no tensor crosses
processes and no rank holds more than its shards plus the tensor it is writing. Rank 0
gathers every file's checksum and interval, writes the manifest once all files are
complete, renames the directory and only then flips `latest`; the last `keep`
directories stay. A resume under any plan and any number of processes reads, for each
of its shards, the intersections with the intervals on disk (`shard_plan.read_plan`).
Frozen models are not saved: they are rebuilt from their checkpoint or seed, as at the
start. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from rlhfc_runtime.algorithms.schedules import AdaptiveKL
from rlhfc_runtime import export as hf_export, inflight, shard_io
from rlhfc_runtime.calls import set_adam_state
from rlhfc_runtime.checkpoint import save_tensors
from rlhfc_runtime.contract.atomic import write_atomic
from rlhfc_runtime.contract.program import Program
from rlhfc_runtime.contract.resume import FORMAT, MANIFEST, VERSION, compare, fingerprint, read_manifest, refusal
from rlhfc_runtime.contract.rundir import RunDirError, step_dir_name, step_dirs
from rlhfc_runtime.errors import RunError

def program_hash(program: Program) -> str:
    return hashlib.sha256(json.dumps(fingerprint(program), sort_keys=True).encode()).hexdigest()[:16]


# ---- save ----------------------------------------------------------------------------
def save(engine, keep: int = 2, export: bool = True) -> Path:
    """Write the checkpoint of `engine.step` (collective over the world); returns its
    directory. Each rank streams its own shards (`shard_io`) and, with `export`, its
    files of each trainable model's HF export (`export.stage_tensors`); once every file
    is complete, the exports' index and config are written, then rank 0 writes the
    manifest, and the exports are published. Any rank's OSError removes the partial
    directory and the staged exports on every rank and raises RunError naming the path;
    the previous checkpoint and export stay."""
    e = engine
    root = e.out / "checkpoint"
    final = root / step_dir_name(e.step)
    part = root / (final.name + ".partial")
    problem = None
    if e.rank == 0:
        try:
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
        except OSError as err:
            problem = _os_message(err, part)
    problem = _agree(problem)
    if problem:
        raise RunError(problem)
    files: dict[str, dict] = {}
    models: dict[str, dict] = {}
    shards: dict[str, list] = {}
    staged: list[tuple] = []
    for name in e.program.trainable():
        spec = e.program.models[name]
        if e.rank not in e.layouts[spec.home].ranks:
            continue
        m = e.models[(name, spec.home)]
        if problem is None:
            try:
                file, entries = shard_io.write_shards(part, name, m.module, m.optimizer)
                if file:
                    files[file] = _digest(part / file)
                shards[name] = entries
            except OSError as err:
                problem = _os_message(err, getattr(err, "filename", None) or part)
        models[name] = {"optimizer_step": _optimizer_step(m),  # and state a train call carries across steps
                        "adaptive_kl": m.adaptive_kl.state_dict() if m.adaptive_kl else None}
        if export:
            tmp, plan, err = hf_export.stage_tensors(e.out, name, m.module, write=problem is None)
            problem = problem or (err and _os_message(err, err.filename))
            if hf_export.is_finisher(m.module):
                staged.append((tmp, plan, m.module, spec))
    try:
        flight, tensors = inflight.pack(e)
        rng = {"python": _jsonable(random.getstate()), "rank": e.rank, "inflight": flight}
        if problem is None:
            files.update(_write_bytes(part / f"rank{e.rank}.json", json.dumps(rng).encode()))
            files.update(_write_tensors(part / f"rank{e.rank}.safetensors", {"torch": torch.get_rng_state(), **tensors}))
    except OSError as err:
        problem = _os_message(err, getattr(err, "filename", None) or part)
    parts = [None] * e.world
    dist.all_gather_object(parts, (files, models, shards, problem))
    problem = next((p[3] for p in parts if p[3]), None)
    if problem is None:  # every file of every rank is complete: the exports' index and config
        try:
            for tmp, plan, module, spec in staged:
                hf_export.finish(tmp, plan, module, spec, _tokenizer(e.program), e.specials)
        except OSError as err:
            problem = _os_message(err, getattr(err, "filename", None) or tmp)
        problem = _first(problem, e.world)
    if e.rank == 0 and problem is None:
        try:
            merged: dict[str, list] = {}
            for p in parts:
                for k, v in p[2].items():
                    merged.setdefault(k, []).extend(v)
            manifest = {
                "format": FORMAT, "version": VERSION, "step": e.step, "world_size": e.world,
                "program_hash": program_hash(e.program), "fingerprint": fingerprint(e.program),
                "program": {"models": {n: {"optimizer": s.optimizer} for n, s in e.program.models.items()},
                            "run": asdict(e.program.run)},
                "layouts": {k: [list(v.ranks), v.dp, v.tp, v.pp] for k, v in e.layouts.items()},
                "loaders": {n: ld.state_dict() for n, ld in e.loaders.items()},
                "models": {k: v for p in parts for k, v in p[1].items()},
                "shards": {k: sorted(v, key=lambda x: (x["file"], x["key"])) for k, v in sorted(merged.items())},
                "files": {k: v for p in parts for k, v in sorted(p[0].items())},
            }
            _write_bytes(part / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(part, final)
            try:
                _write_bytes(root / "latest", str(e.step).encode())
            except OSError:
                os.replace(final, part)  # not complete until `latest` says so
                raise
            for old in step_dirs(e.out)[max(1, keep):]:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            problem = _os_message(err, getattr(err, "filename", None) or part)
    if e.rank == 0 and problem:
        shutil.rmtree(part, ignore_errors=True)
    problem = _agree(problem if e.rank == 0 else None)
    for tmp, *_ in staged:
        if problem:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            hf_export.publish(tmp)
    if problem:
        raise RunError(f"{problem}; the checkpoint of step {e.step} was not written, the previous one is intact")
    return final


def _tokenizer(program: Program) -> str | None:
    return next((d.tokenizer for d in program.datasets.values() if d.tokenizer), None)


def _agree(problem: str | None) -> str | None:
    """Rank 0's problem (or None) on every rank."""
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first(problem: str | None, world: int) -> str | None:
    """The first rank's problem (or None) on every rank."""
    box = [None] * world
    dist.all_gather_object(box, problem)
    return next((p for p in box if p), None)


def _optimizer_step(m) -> float:
    for p in m.module.parameters():
        if "step" in m.optimizer.state.get(p, {}):
            return float(m.optimizer.state[p]["step"])
    return 0.0


def _write_tensors(path: Path, tensors: dict) -> dict:
    save_tensors(path, tensors)
    return {path.name: _digest(path)}


def _write_bytes(path: Path, data: bytes) -> dict:
    write_atomic(path, data)
    return {path.name: _digest(path)}


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def _os_message(err: OSError, path) -> str:
    return f"{path}: {err.strerror or err}"


def _jsonable(state):
    return [_jsonable(x) for x in state] if isinstance(state, (tuple, list)) else state


# ---- choose and validate -------------------------------------------------------------
def problem_of(directory: Path) -> str | None:
    """Why a step directory cannot be resumed from (None: it can)."""
    try:
        manifest = read_manifest(directory)
    except RunDirError as err:
        return str(err)
    for name, want in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if _digest(path) != want:
            return f"{path} does not match its checksum"
    return None


def choose(out: Path) -> tuple[Path | None, list[str]]:
    """The newest complete, intact step directory (None: nothing to resume) and notes on
    what was skipped. A pickled checkpoint of an older rlhfc is never loaded."""
    notes = []
    ckpt = Path(out) / "checkpoint"
    if any(ckpt.glob("rank*.pt")) and not step_dirs(out):
        raise RunError(f"{ckpt} holds an old pickle checkpoint (rank*.pt), which is not loaded since it could run "
                       f"code; start over with --overwrite")
    for d in step_dirs(out):
        problem = problem_of(d)
        if problem is None:
            return d, notes
        notes.append(f"skipping checkpoint {d.name}: {problem}")
    return None, notes


def prepare(out: Path, program: Program) -> tuple[Path | None, list[str]]:
    """What a resume continues from, and what to tell the user; RunError if it cannot."""
    directory, notes = choose(out)
    if directory is None:
        return None, notes + [f"no checkpoint in {Path(out) / 'checkpoint'}: starting at step 0"]
    manifest = read_manifest(directory)
    refuse, apply = compare(manifest, program)
    if refuse:
        raise RunError(refusal(directory, refuse))
    if notes:
        notes.append(f"resuming from the newest intact checkpoint, {directory.name}")
    if apply:
        notes.append("resuming with changed settings: " + "; ".join(apply))
    return directory, notes


# ---- restore -------------------------------------------------------------------------
def restore(engine, directory: Path) -> str | None:
    """Load `directory` into the engine on this rank (its own slices of every trainable
    model it holds at home); returns a note when RNG states could not carry over."""
    e = engine
    manifest = read_manifest(directory)
    e.step = int(manifest["step"])
    for name in e.program.trainable():
        key = (name, e.program.models[name].home)
        if key not in e.models:
            continue
        m = e.models[key]
        entries = manifest["shards"][name]
        shard_io.read_shards(directory, entries, m.module, "weight")
        _load_optimizer(m, directory, entries, manifest["models"][name]["optimizer_step"])
        if manifest["models"][name].get("adaptive_kl"):
            m.adaptive_kl = AdaptiveKL(0.0, 0.0, 1.0)
            m.adaptive_kl.load_state_dict(manifest["models"][name]["adaptive_kl"])
    for name, ld in e.loaders.items():
        ld.load_state_dict(manifest["loaders"][name])
    for key in e.versions:  # the home copies hold the weights of `step` updates
        e.versions[key] = e.step
    if manifest["world_size"] == e.world:
        state = json.loads((directory / f"rank{e.rank}.json").read_text())
        rng = state["python"]
        random.setstate((rng[0], tuple(rng[1]), rng[2]))
        with safe_open(str(directory / f"rank{e.rank}.safetensors"), "pt") as f:
            torch.set_rng_state(f.get_tensor("torch"))
            inflight.unpack(e, state.get("inflight", {}), f.get_tensor)
        return None
    seed = e.seed * 1009 + e.rank + 7919 * e.step
    random.seed(seed)
    torch.manual_seed(seed)
    return (f"the checkpoint was written by {manifest['world_size']} processes, this run has {e.world}: weights, "
            f"optimizer and data positions carry over, random states are reseeded"
            + (", rollouts in flight are dropped (the next batches are sampled anew)" if e.max_staleness else ""))


def _load_optimizer(m, directory: Path, entries: list[dict], step: float) -> None:
    if step <= 0:
        return
    module = m.module
    moments = {kind: shard_io.read_shards(directory, entries, module, kind) for kind in ("exp_avg", "exp_avg_sq")}
    set_adam_state(m.optimizer, step, {p: (moments["exp_avg"][n], moments["exp_avg_sq"][n])
                                       for n, p in module.named_parameters()})


def read_weights(directory: Path, model: str) -> dict[str, torch.Tensor]:
    """A trainable model's full weights in a checkpoint step directory, assembled from its
    shards (for tests and tools: it holds the whole model)."""
    return shard_io.read_full(directory, read_manifest(directory)["shards"][model])
