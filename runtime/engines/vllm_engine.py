"""vLLM as a generate call's engine: built once per run, fed the call's weights before
every call, verified to hold them, decoding token ids in and out.

Where the engine lives. verl runs vLLM SPMD inside its training processes
(`distributed_executor_backend="external_launcher"`): every rank of the torch world
builds the engine, and vLLM's tp * pp * dp must be the whole world, whose default group
vLLM then uses for its own groups. rlhfc's generate call runs on its own layout, often a
part of the world, and the world's default group is rlhfc's; so here each dp replica of
the generate layout hosts ONE single-rank engine, owned by the replica's first rank and
run in vLLM's own engine process (spawned, never forked: a fork would inherit rlhfc's
process group, which vLLM would then take for its world). On CPU that costs nothing
that matters: vLLM's CPU backend has no tensor-parallel speed-up to lose on one
machine's cores, and the weights reach the engine as one buffer per sync. On GPUs an
engine with tp > 1 should run under external_launcher on a generate layout that spans
the world; that path is not built yet.

The weights. Before every call the call's copy of the actor (the trainer's weights,
already reallocated into the generate layout by the op program) is reallocated once
more, into a layout of the replicas' first ranks with tp = pp = 1: every leader then
holds full tensors (no other rank sends anything when the generate layout has tp = pp
= 1). They go to vLLM's `reload_weights` (`vllm_worker`), and the engine reports back
the version it holds and per-tensor checksums of what arrived; a mismatch with the
trainer's own (a sync skipped, lost, or wrong) stops the run with `WeightSyncError`.

Sampling: one vLLM seed per row, from the call's seed and the row's global index, so
a row's tokens do not depend on the plan; the raw log-probs of the sampled tokens
(`logprobs_mode="raw_logprobs"`: before temperature, top-k and top-p, the quantity the
trainer recomputes); stop at the call's EOS only (included in the response, as the own
loop does; `ignore_eos` turns off the EOS of the engine's config.json).
Prefix caching is off: a cached prefix would hold keys and values of older weights.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from rlhfc_runtime.contract.family import hf_class
from rlhfc_runtime.contract.kinds import Head
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.contract.shapes import param_table
from rlhfc_runtime.engines import RolloutEngine
from rlhfc_runtime.engines.vllm_worker import checksums
from rlhfc_runtime.generate import Generation, SamplingParams
from rlhfc_runtime.realloc import reallocate

# Tests: the number of the generate call (1, 2, ...) whose weight sync is skipped, to
# see the verification stop the run.
SKIP_SYNC_ENV = "RLHFC_TEST_SKIP_SYNC"
SEED_MODULUS = 2**31 - 1


class WeightSyncError(RuntimeError):
    """The engine does not hold the weights the trainer gave it for this call."""

    located = True  # the message says everything: no traceback


def row_seed(call_seed: int, row: int) -> int:
    """vLLM's seed of global row `row` of a call: from the run's seed, step and row only."""
    return (call_seed * 1_000_003 + row) % SEED_MODULUS


def leaders(layout: Layout) -> Layout:
    """One rank per dp replica (its first), each holding the whole model."""
    return Layout(tuple(layout.rank_at(0, d, 0) for d in range(layout.dp)), layout.dp, 1, 1)


class VllmRollout(RolloutEngine):
    """Generation on vLLM; see the module's docstring."""

    name = "vllm"

    def __init__(self):
        super().__init__()
        self.llm = None
        self.version = 0  # syncs this process has made (one per generate call)
        # On GPUs the engine sleeps between calls (level 1: weights to host memory, KV
        # pool freed), so what the plan priced as the call's memory is free for the
        # other calls; vLLM's CPU backend has no sleep mode. Not yet run on a GPU.
        self.gpu = torch.cuda.is_available()

    def generate(self, module, prompt_ids, prompt_mask, params: SamplingParams, settings: dict) -> Generation:
        g = module.groups
        lay = g.layout
        leader = lay.rank_at(0, g.dp_rank, 0)
        full = self._full_weights(module)
        self.version += 1
        self.stats = {}
        out = None
        if g.rank == leader:
            self._start(module, settings)
            if self.gpu:  # awake from the previous call's sleep (a new engine is awake)
                self.llm.wake_up()
            self._sync(full, self.version)
            out = self._decode(prompt_ids, prompt_mask, params)
            if self.gpu:
                self.llm.sleep(level=1)
        return _share(out, prompt_ids, prompt_mask, params, g, leader)

    def _full_weights(self, module) -> dict:
        """Full tensors on the replica's leader ({} on the other ranks)."""
        lay = module.groups.layout
        if lay.tp == 1 and lay.pp == 1:
            return module.shards()
        table = param_table(module.cfg.shape, Head(module.head))
        return reallocate(module.shards(), table, module.cfg.shape.n_layers, lay, leaders(lay), module.groups.rank,
                          dtype=module.dtype, device=torch.device("cpu"))

    def _start(self, module, settings: dict) -> None:
        """The engine, sized by the plan: `gpu_memory_utilization` (its share of the
        device; on CPU, where vLLM reads it as a share of host memory, the pool is set in
        bytes instead: `kv_cache_bytes`) and `max_model_len` (the call's prompt + new tokens)."""
        if self.llm is not None:
            return
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM  # noqa: PLC0415 - only runs that ask for vLLM import it

        start = time.time()
        folder = tempfile.mkdtemp(prefix="rlhfc-vllm-")
        atexit.register(shutil.rmtree, folder, True)
        dtype = "float32" if settings["precision"] == "fp32" else "bfloat16"
        cfg = {**module.cfg.hf, "architectures": [hf_class(module.cfg.shape, False)], "torch_dtype": dtype}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        self.llm = LLM(model=folder, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                       max_model_len=int(settings["max_model_len"]), enforce_eager=True,
                       gpu_memory_utilization=float(settings["gpu_memory_utilization"]),
                       kv_cache_memory_bytes=None if self.gpu else int(settings["kv_cache_bytes"]),
                       enable_prefix_caching=False, enable_sleep_mode=self.gpu, logprobs_mode="raw_logprobs", seed=0,
                       worker_extension_cls="rlhfc_runtime.engines.vllm_worker.WeightSync")
        atexit.register(self.close)
        self.stats["engine_start_s"] = time.time() - start
        self.stats["engine_start_estimate_s"] = float(settings["engine_start_s"])

    def close(self) -> None:
        """Stop vLLM's engine process (at exit: it would outlive a failed run otherwise)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def _sync(self, full: dict, version: int) -> None:
        from safetensors.torch import save  # noqa: PLC0415

        start = time.time()
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in full.items()}
        if os.environ.get(SKIP_SYNC_ENV) != str(version):
            self.stats["engine_load_s"] = self.llm.collective_rpc("rlhfc_load", args=(save(tensors), version))[0]
        held, sums = self.llm.collective_rpc("rlhfc_state")[0]
        mine = checksums(tensors)
        self.stats["sync_s"] = time.time() - start  # the copy into the engine and its check, engine_load_s included
        stale = sorted(n for n in mine if n not in sums or not _close(sums[n], mine[n]))
        if held != version or stale:
            raise WeightSyncError(
                f"weight sync check failed before generate call {version}: the vLLM engine holds weights version "
                f"{held}, the actor's current weights are version {version}"
                + (f", and {len(stale)} of {len(mine)} tensors differ (first: {stale[0]})" if stale else "")
                + ": a sync did not reach the engine, so its rollouts would come from a stale policy")

    def _decode(self, prompt_ids, prompt_mask, params: SamplingParams) -> Generation:
        from vllm import SamplingParams as VllmParams  # noqa: PLC0415
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        rows = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        stop = [params.eos_token_id] if params.eos_token_id is not None else None
        sampling = [VllmParams(
            max_tokens=params.max_new_tokens, temperature=0.0 if params.greedy else params.temperature,
            top_k=0 if params.greedy else params.top_k, top_p=1.0 if params.greedy else params.top_p,
            seed=row_seed(params.seed, params.first_row + i), logprobs=0, stop_token_ids=stop, ignore_eos=True,
            detokenize=False,
        ) for i in range(len(rows))]
        start = time.time()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], sampling, use_tqdm=False)
        self.stats["decode_s"] = time.time() - start
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logps = [[next(iter(d.values())).logprob for d in o.outputs[0].logprobs] for o in outs]
        return _generation(prompt_ids.cpu(), prompt_mask.cpu(), tokens, logps, params.pad_token_id)


def _close(a, b) -> bool:
    return all(abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


def _generation(prompt_ids, prompt_mask, tokens: list[list[int]], logps: list[list[float]], pad: int) -> Generation:
    """The own loop's `Generation` from per-row token and log-prob lists."""
    batch, plen = prompt_ids.shape
    n = max(max((len(t) for t in tokens), default=0), 1)
    new = torch.full((batch, n), pad, dtype=torch.long)
    lp = torch.zeros(batch, n)
    response = torch.zeros(batch, n, dtype=torch.long)
    for i, (t, l) in enumerate(zip(tokens, logps)):
        new[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        lp[i, :len(l)] = torch.tensor(l)
        response[i, :len(t)] = 1
    return Generation(torch.cat([prompt_ids, new], 1), lp, torch.cat([prompt_mask.long(), response], 1),
                      torch.cat([torch.zeros_like(prompt_mask, dtype=torch.long), response], 1), plen)


def _share(out: Generation | None, prompt_ids, prompt_mask, params, g, leader: int) -> Generation:
    """The leader's generation on every rank of its replica (they hold the same rows)."""
    device = prompt_ids.device
    if len(g.mp_ranks) == 1:
        return Generation(*(t.to(device) for t in (out.sequences, out.logprobs, out.attention_mask,
                                                    out.response_mask)), out.prompt_len)
    width = torch.tensor([out.logprobs.shape[1] if out is not None else 0])
    dist.broadcast(width, src=leader, group=g.mp)
    batch, plen = prompt_ids.shape
    n = int(width)
    if out is None:
        out = Generation(torch.zeros(batch, plen + n, dtype=torch.long), torch.zeros(batch, n),
                         torch.zeros(batch, plen + n, dtype=torch.long), torch.zeros(batch, plen + n, dtype=torch.long),
                         plen)
    for t in (out.sequences, out.logprobs, out.attention_mask, out.response_mask):
        dist.broadcast(t, src=leader, group=g.mp)
    return Generation(*(t.to(device) for t in (out.sequences, out.logprobs, out.attention_mask,
                                                out.response_mask)), plen)
