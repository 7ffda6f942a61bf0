"""The execution engine generated programs import: it starts the world, builds the
models in their home layouts, executes the program's ops once per step (one handler per
op type), logs metrics and checkpoints so that a run can resume exactly.

Generated code calls `main(PROGRAM, LAYOUTS, GROUPS, OPS)`. Under torchrun (RANK in the
environment) this process is one worker; otherwise it spawns `world_size` local workers
itself. Every op names the layouts it touches; ranks outside them return at once, and
every collective runs only over the ranks the op names, in the op order that all ranks
share, so a run cannot deadlock on a schedule.

Asynchronous programs (`max_staleness` K > 0): the body of step t runs each op for
iteration t + op.ahead, so data is kept per iteration until its step ends, and every
copy of a trainable model carries its version (the updates it has seen). A call that
would read weights more than K updates old stops the run: a weight sync that did not
happen is an error, never a silent sample from an old policy.
"""

from __future__ import annotations

import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from rlhfc_runtime import calls, ckpt_store
from rlhfc_runtime import dist as rdist
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.contract.ops import Call, Drop, Load, Move, Offload, Op, Realloc, Reload
from rlhfc_runtime.contract.program import Program
from rlhfc_runtime.memory import CallMemory, resident_bytes
from rlhfc_runtime.offload import offload as offload_shards
from rlhfc_runtime.offload import reload as reload_shards
from rlhfc_runtime.metrics_log import MetricsLog
from rlhfc_runtime.realloc import reallocate
from rlhfc_runtime.rewards import with_logprobs
from rlhfc_runtime.transfer import receive_batch, rows_of, send_batch

__all__ = ["Engine", "Layout", "main"]


class Engine:
    """One worker's state: models per (name, layout), data per (key, layout), step."""

    def __init__(self, program: Program, layouts: dict[str, Layout], groups, options: dict):
        self.program = program
        self.layouts = layouts
        self.options = options
        self.rank = rdist.init_from_env()
        self.world = dist.get_world_size()
        if self.world != program.world_size:
            raise SystemExit(f"this program was planned for {program.world_size} processes, got {self.world}")
        rdist.ensure_groups(layouts.values(), groups)  # every group once, in one order on every rank
        self.device = rdist.device_for_rank()
        self.precision: dict[tuple[str, str], str] = {}  # (model, layout) -> its calls' precision
        self.out = Path(options["out"])
        self.step = 0
        self.seed = program.run.seed
        _seed_everything(self.seed * 1009 + self.rank)
        self.models = {}  # (model, layout) -> runtime model on this rank
        self.it = 0  # the iteration the op being run works for (step + op.ahead)
        self.data: dict[tuple[int, str, str], dict] = {}  # (iteration, key, layout) -> this rank's rows
        self.rows: dict[tuple[int, str], int] = {}  # (iteration, key) -> global row count
        self.max_staleness = program.run.max_staleness
        # (model, layout) -> updates the weights there have seen, on every rank; trainable models only
        self.versions: dict[tuple[str, str], int] = {}
        self.sampled: dict[int, int] = {}  # iteration -> policy version its rollouts came from
        self.loaders = {}
        self.host: dict[tuple[str, str], dict] = {}  # (model, layout) -> offloaded weights
        self.stats: dict[int, dict[str, float]] = {}  # iteration -> what its calls report, logged at its step
        self.measuring = False  # count this step's peak memory per call (`run`)
        run = program.run  # the compiler's values; the command line may override them
        self.steps = int(options.get("steps") or run.steps)
        self.save_every = int(options.get("save_every") or run.save_every)
        self.keep = int(options.get("keep") or run.keep)
        self.samples: list[dict] = []  # decoded rows of this step's reward calls (this rank's share)
        self.generated: list[dict] = []  # log-probs of those rows, from the generate calls that made them
        self.drawn: dict[tuple[int, str], list[int]] = {}  # (iteration, dataset) -> its rows in the batch
        self.spans: dict[str, tuple[float, float]] = {}  # op -> (start, end), wall clock (time.time)
        self.sending: list = []  # this iteration's posted data sends (torch Work), not yet waited for
        for name, spec in program.models.items():
            home = spec.home
            if spec.trainable:
                self.versions[(name, home)] = 0
            if spec.neural and self.rank in layouts[home].ranks:
                self.models[(name, home)] = calls.build_model(spec, layouts[home])
                if spec.offloaded:  # waits in host memory until its call reloads it
                    self.offload(Offload(name, home))
        for name, spec in program.datasets.items():
            self.loaders[name] = calls.build_loader(name, spec, self.seed)
        self.specials = calls.special_ids(next(iter(self.loaders.values()))) if self.loaders else {}

    @contextmanager
    def _timed(self, op: str):
        """Record `op`'s wall-clock (start, end) on this rank; `_gather` combines the ranks.
        On CUDA the device is synchronised at both ends, so an op's time includes its
        queued kernels instead of leaking them into the next op."""
        self._sync()
        start = time.time()
        yield
        self._sync()
        self.spans[op] = (start, time.time())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _copy_dtype(self, model: str, layout: str) -> torch.dtype:
        """The dtype of `model`'s parameters in `layout`, the same on every rank: fp32 in
        a trainable model's home (master weights), else its calls' precision there (fp32
        until a call has run: the first iteration casts at the call instead)."""
        spec = self.program.models[model]
        if spec.trainable and layout == spec.home:
            return torch.float32
        return calls.DTYPES[self.precision.get((model, layout), "fp32")]

    # ---- ops ---------------------------------------------------------------------
    def load(self, op: Load) -> None:
        """Every rank draws the same next batch (deterministic sampler), keeps it whole."""
        batch = self.loaders[op.dataset].next_batch(self.program.run.batch)
        batch = {k: v.to(self.device) for k, v in batch.items()}  # loaders make host tensors
        self.drawn[(self.it, op.dataset)] = self.loaders[op.dataset].last
        self.rows[(self.it, op.key)] = calls.batch_rows(batch)
        self.data[(self.it, op.key, "*")] = batch

    def _input(self, key: str, layout: str) -> dict:
        it = self.it
        if (it, key, layout) not in self.data:  # a loaded key: take this rank's rows
            lo, hi = rows_of(self.rows[(it, key)], self.layouts[layout], self.rank)
            self.data[(it, key, layout)] = calls.take_rows(self.data[(it, key, "*")], lo, hi)
        return self.data[(it, key, layout)]

    def _policy_version(self, op: Call) -> int | None:
        """The version of the trainable weights `op` reads, checked against K on every rank:
        a call reads weights at most `max_staleness` updates behind its iteration (a train
        call: none behind), or a sync the schedule needed did not happen."""
        if not self.program.models[op.model].trainable:
            return None
        version = self.versions.get((op.model, op.layout))
        allowed = 0 if op.kind == "train" else self.max_staleness
        if version is None or not 0 <= self.it - version <= allowed:
            have = "no copy" if version is None else f"weights {self.it - version} update(s) old (version {version})"
            raise RuntimeError(f"call {op.name!r} of step {self.it + 1} would read {op.model!r} in {op.layout} with "
                               f"{have}; max_staleness = {self.max_staleness} allows {allowed}: a weight sync "
                               f"(reallocation) the program needs did not happen")
        return version

    def call(self, op: Call) -> None:
        """Run one call on this rank's part of its layout (no-op elsewhere). Its settings
        are the compiler's resolved values: the engine adds only what exists at run time
        (step, seed, the tokenizer's special ids) and checks the rows it was promised."""
        name, model, kind, using, layout = op.name, op.model, op.kind, op.interface, op.layout
        inputs, outputs, settings = op.inputs, op.outputs, dict(op.settings)
        lay = self.layouts[layout]
        for key in outputs:  # every rank tracks row counts, so moves agree on them
            self.rows[(self.it, key)] = settings["rows"]
        if "precision" in settings:  # every rank: reallocations into this layout agree on the wire dtype
            self.precision[(model, layout)] = settings["precision"]
        version = self._policy_version(op)
        if kind == "generate" and version is not None:
            self.sampled[self.it] = version
        if kind == "train" and version is not None:  # every rank: the update this call makes
            self.versions[(model, layout)] = self.it + 1
        if self.rank not in lay.ranks:
            return
        with self._timed(name):
            spec = self.program.models[model]
            batch = {k: self._input(k, layout) for k in inputs}
            runtime_model = self.models[(model, layout)] if spec.neural else None
            context = {**settings, **self.specials, "step": self.it, "seed": self.seed}
            measure = self.measuring and runtime_model is not None
            # a train call needs its copy's optimizer state; any other call only the weights,
            # as the plan prices it, whether or not the copy it borrows has moments by now
            optimizer = runtime_model.optimizer if measure and kind == "train" else None
            resident = resident_bytes(runtime_model.module, optimizer) if measure else 0
            groups = rdist.rank_groups(lay, self.rank)
            source = None if spec.neural else self._prompt_source()
            with CallMemory(self.device, resident, active=measure) as memory:
                if source is not None:
                    scores = {k: batch[k] for k in inputs[1:]}  # the score keys a python reward combines
                    produced, stats, samples = calls.reward_call(spec, batch[inputs[0]], scores, outputs, context,
                                                                 groups, *source)
                    self.samples += [{"step": self.it + 1, "call": name, "seq_key": inputs[0], **row}
                                     for row in samples]
                elif spec.functions or spec.score_keys:
                    raise RuntimeError(f"call {name!r}: a python reward needs the prompts of exactly one prompt dataset")
                else:
                    made = []
                    produced, stats = calls.run_call(kind, using, runtime_model, spec, batch, outputs, context, groups,
                                                     made)
                    self.generated += [{**row, "step": self.it + 1, "policy_version": version} for row in made]
            if measure:
                self.stats.setdefault(self.it, {})[f"peak_bytes/{name}"] = float(memory.peak_bytes)
            for key in outputs:
                self.data[(self.it, key, layout)] = produced[key]
            local = calls.batch_rows(produced[outputs[0]]) if outputs else calls.batch_rows(batch[inputs[0]])
            if kind == "generate":  # each dp rank samples group_size rows for each of its prompts
                expected = calls.batch_rows(batch[inputs[0]]) * int(settings["group_size"])
            else:
                lo, hi = rows_of(settings["rows"], lay, self.rank)
                expected = hi - lo
            if local != expected:
                raise RuntimeError(f"call {name!r} made {local} rows on rank {self.rank} where the compiled "
                                   f"program says {expected} (of {settings['rows']}): a compiler bug")
            logged = self.stats.setdefault(self.it, {})
            logged[f"rows/{name}"] = float(local * lay.dp)  # averaged over ranks: the global count
            logged.update({calls.metric_key(name, k, settings): float(v) for k, v in stats.items()})
            reward = self.program.reward_key
            if reward in outputs:  # the reward curve, whatever the algorithm
                logged["reward"] = float(produced[reward][reward].float().mean())

    def _prompt_source(self):
        """(loader, rows drawn) of this iteration's one prompt dataset, which reward calls score."""
        names = [n for i, n in self.drawn if i == self.it and set(self.loaders[n].fields) == {"prompt"}]
        return (self.loaders[names[0]], self.drawn[(self.it, names[0])]) if len(names) == 1 else None

    def realloc(self, op: Realloc) -> None:
        """Build the model's shards in `dst` from `src` (point-to-point, src ∪ dst only)."""
        model, src, dst = op.model, op.src, op.dst
        if (model, src) in self.versions:  # every rank: the copy is as new as its source
            self.versions[(model, dst)] = self.versions[(model, src)]
        s, d = self.layouts[src], self.layouts[dst]
        if self.rank not in s.ranks and self.rank not in d.ranks:
            return
        with self._timed(f"realloc {model} {src}->{dst}"):
            spec = self.program.models[model]
            source = self.models.get((model, src))
            shards = reallocate(
                calls.shards_of(source) if source is not None else {},
                calls.param_shapes(spec), spec.shape.n_layers, s, d, self.rank,
                dtype=self._copy_dtype(model, dst), device=self.device,
                devices_per_node=self.program.devices_per_node,
            )
            if self.rank in d.ranks:
                target = self.models.get((model, dst))
                if target is None:
                    self.models[(model, dst)] = calls.model_from_shards(spec, shards, d, self.rank)
                else:
                    calls.load_shards(target, shards)

    def offload(self, op: Offload) -> None:
        """Free the model's device copy in its layout; its weights wait in host memory. A
        frozen model's weights never change, so the host copy is made once and kept."""
        model, layout = op.model, op.layout
        if self.rank not in self.layouts[layout].ranks:
            return
        with self._timed(f"offload {model} {layout}"):
            copy = self.models.pop((model, layout))
            if (model, layout) not in self.host:
                self.host[(model, layout)] = offload_shards(calls.shards_of(copy))

    def reload(self, op: Reload) -> None:
        """Bring the model's weights back from host memory to its layout (no-op while there)."""
        model, layout = op.model, op.layout
        if self.rank not in self.layouts[layout].ranks or (model, layout) in self.models:
            return
        with self._timed(f"reload {model} {layout}"):
            shards = reload_shards(self.host[(model, layout)], self.device)
            spec = self.program.models[model]
            self.models[(model, layout)] = calls.model_from_shards(spec, shards, self.layouts[layout], self.rank)

    def drop(self, op: Drop) -> None:
        """Free a non-home parameter copy after its last use in the iteration."""
        self.models.pop((op.model, op.layout), None)
        self.versions.pop((op.model, op.layout), None)

    def move(self, op: Move) -> None:
        """Give every rank of `dst` its rows of the key from the ranks of `src` that hold
        them: senders post their rows and go on (`finish_sends` waits at the step's end),
        receivers wait for theirs."""
        key, src, dst = op.key, op.src, op.dst
        s, d = self.layouts[src], self.layouts[dst]
        if self.rank not in s.ranks and self.rank not in d.ranks:
            return
        with self._timed(f"move {key} {src}->{dst}"):
            local, rows = self.data.get((self.it, key, src)), self.rows[(self.it, key)]
            self.sending += send_batch(local, rows, s, d, self.rank, device=self.device)
            if self.rank in d.ranks:
                self.data[(self.it, key, dst)] = receive_batch(local, rows, s, d, self.rank, device=self.device)

    def finish_sends(self) -> None:
        """Wait until every row this rank sent in the iteration has arrived."""
        for work in self.sending:
            work.wait()
        self.sending = []

    # ---- the loop ----------------------------------------------------------------
    def run_op(self, op: Op, iteration: int) -> None:
        """Run one op for `iteration` (its handler by the op's type)."""
        self.it = iteration
        HANDLERS[type(op)](self, op)

    def body(self, ops: tuple[Op, ...], prologue: bool) -> None:
        """Step `self.step`: every op for iteration step + op.ahead (none past the run's
        last step). The `prologue` first runs, for the next iterations, the ahead ops that
        earlier steps would have run (a fresh start or a resume without rollouts in flight)."""
        step = self.step
        if prologue:
            for i in range(step, min(step + max((op.ahead for op in ops), default=0), self.steps)):
                for op in ops:
                    if op.ahead > i - step:
                        self.run_op(op, i)
        for op in ops:
            if step + op.ahead < self.steps:
                self.run_op(op, step + op.ahead)
        self.finish_sends()
        for key in [k for k in self.data if k[0] <= step]:  # this iteration is done
            del self.data[key]
        self.rows = {k: v for k, v in self.rows.items() if k[0] > step}
        self.drawn = {k: v for k, v in self.drawn.items() if k[0] > step}

    def in_flight(self) -> bool:
        """Whether rollouts of later iterations wait in this rank's data (restored or made)."""
        return any(k[0] >= self.step for k in self.rows)

    def run(self, ops: tuple[Op, ...], stop=None) -> dict:
        """Steps until `steps`, with metrics on rank 0 and checkpoints every `save_every`
        (the last `keep` kept). `stop` (signals.StopFlag) is asked at every step boundary:
        a signal on any rank ends the loop there on all ranks, with a checkpoint. Returns
        {"stopped": signal or 0, "step": the last step done, "saved": the newest checkpoint's step}."""
        steps, save_every = self.steps, self.save_every
        if self.options.get("resume"):
            self.restore()
        saved = self.step
        log = MetricsLog(self.out, self.step, self.options.get("wandb")) if self.rank == 0 else None
        first = self.step
        prologue = not self.in_flight()
        while True:
            signum = stop.agreed() if stop is not None else 0
            if signum:
                if self.step > saved:
                    self.save()
                    saved = self.step
                return {"stopped": signum, "step": self.step, "saved": saved}
            if self.step >= steps:
                return {"stopped": 0, "step": self.step, "saved": saved}
            # Peak memory is counted tensor by tensor on CPU (slow): on this process's first
            # step and on every checkpoint step, which metrics.jsonl then carries.
            self.measuring = self.step == first or (self.step + 1) % save_every == 0
            t0 = time.perf_counter()
            self.spans, self.samples = {}, []
            self.body(ops, prologue)
            prologue = False
            record, samples = self._gather(time.perf_counter() - t0)
            self.step += 1
            if log is not None:
                log.write(record, samples)
            if self.step % save_every == 0 or self.step == steps:
                self.save()
                saved = self.step
            die_at = os.environ.get("RLHFC_FAIL_AT_STEP")  # tests: a worker dies mid-run
            if die_at and int(die_at) == self.step and self.rank == self.world - 1:
                os._exit(17)

    def _gather(self, seconds: float) -> tuple[dict, list]:
        """One metrics record: stats averaged over the ranks that report them, per-op times
        from the last rank's start to the last rank's end (a rank that arrives early waits
        in the op's first collective; that wait is the schedule's, not the op's), next to
        the planner's estimates. Rank 0 builds it (the one that logs); the others get ({}, [])."""
        stats = self.stats.pop(self.step, {})
        if self.step in self.sampled:  # how many updates behind the policy that sampled this step's batch was
            stats["staleness"] = float(self.step - self.sampled.pop(self.step))
        # every generated row this rank still holds: the samples that show it may be another
        # rank's, logged now or (made ahead) in a later step; those of this step are done after it
        parts = rdist.gather_json((stats, self.spans, self.samples, self.generated), self.world)
        self.generated = [g for g in self.generated if g["step"] > self.step + 1]
        if parts is None:
            return {}, []
        stats: dict[str, list[float]] = {}
        spans: dict[str, tuple[float, float]] = {}
        samples = with_logprobs([row for part in parts for row in part[2]], [row for part in parts for row in part[3]])
        for s, t, _, _ in parts:
            for k, v in s.items():
                stats.setdefault(k, []).append(v)
            for k, (start, end) in t.items():
                last_start, last_end = spans.get(k, (start, end))
                spans[k] = (max(last_start, start), max(last_end, end))
        times = {k: end - start for k, (start, end) in spans.items()}
        record = {"step": self.step + 1, **{k: max(v) if k.startswith("peak_bytes/") else sum(v) / len(v)
                                        for k, v in sorted(stats.items())}}  # peaks: the fullest rank
        record["time/iteration"] = seconds
        record["estimate/iteration"] = self.program.estimated_iteration
        record.update({f"time/{k}": v for k, v in sorted(times.items())})
        record.update({f"estimate/{k}": v for k, v in self.program.estimates.items()})
        record.update({f"estimate/peak_bytes/{k}": v for k, v in self.program.estimated_peak_bytes.items()})
        return record, samples

    # ---- checkpoints -------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint at an iteration boundary (models are home): ckpt_store's versioned,
        layout-free step directory, and each trainable model's HF export in OUT/hf."""
        ckpt_store.save(self, keep=self.keep, export=True)

    def restore(self) -> None:
        """Continue from the checkpoint the launcher chose (`options["checkpoint"]`), or
        the newest intact one; rank 0 says what it skipped or changed."""
        chosen = self.options.get("checkpoint")
        if chosen:
            directory, notes = Path(chosen), []
        else:
            directory, notes = ckpt_store.prepare(self.out, self.program)
        if directory is not None:
            note = ckpt_store.restore(self, directory)
            notes += [note] if note else []
        if self.rank == 0:
            for note in notes:
                print(f"rlhfc: {note}", file=sys.stderr, flush=True)


HANDLERS = {Load: Engine.load, Call: Engine.call, Realloc: Engine.realloc, Drop: Engine.drop, Move: Engine.move,
            Offload: Engine.offload, Reload: Engine.reload}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def main(program: Program, layouts: dict[str, Layout], groups, ops: tuple[Op, ...], here: str, argv=None) -> None:
    """Entry point of a generated program (`here` is its __file__): see launch.main."""
    from rlhfc_runtime.launch import main as launch_main

    launch_main(program, layouts, groups, ops, here, argv)
