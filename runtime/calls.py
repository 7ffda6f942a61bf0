"""How the engine runs one call: the glue between the op program and the runtime's
pieces (sharded models, the interface registry, generation, data loaders).

Data convention: every data key holds a dict of tensors whose first dimension is the
batch row (`seq` as `algorithms.batch` describes it; a per-token tensor such as `logp`
as {"logp": tensor}), so `transfer.redistribute_batch` can move any key.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rlhfc_runtime.contract.budget import balanced
from rlhfc_runtime.contract.kinds import Head
from rlhfc_runtime.algorithms.ops import sequence_score
from rlhfc_runtime.algorithms.registry import OLD_LOGP, REGISTRY, bind, rollout_kl, rule_scores
from rlhfc_runtime.algorithms.schedules import AdaptiveKL, lr_factor
from rlhfc_runtime.checkpoint import checkpoint_config, init_random, load_checkpoint
from rlhfc_runtime.contract.family import config_json, shape_from_hf
from rlhfc_runtime.data.loaders import JsonlLoader
from rlhfc_runtime.data.tokenizer import load_tokenizer
from rlhfc_runtime.dist import all_gather_rows, device_for_rank, rank_groups
from rlhfc_runtime.contract.interfaces import ENGINE_LOGP_OF, recomputes_old_logp, trainer_recomputes_rollout
from rlhfc_runtime.engines import engine as rollout_engine
from rlhfc_runtime.generate import SamplingParams
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.model import DTYPES, ModelConfig, ShardedDecoder, next_token_stats
from rlhfc_runtime.contract.program import DatasetSpec, ModelSpec
from rlhfc_runtime.contract.shapes import Param, param_table
from rlhfc_runtime.rewards import RewardError, as_tensor, sample_rows, score_rows, shown_logprobs
from rlhfc_runtime.transfer import rows_of


@dataclass
class RuntimeModel:
    """A model's shard on this rank in one layout, with its optimizer if it trains here."""

    module: ShardedDecoder
    optimizer: torch.optim.Optimizer | None
    # State a train call carries across steps (the adaptive KL coefficient): plain
    # numbers, saved in the checkpoint with the model (`ckpt_store`).
    adaptive_kl: AdaptiveKL | None = None


def model_config(spec: ModelSpec) -> dict:
    """The config.json a model's copies are built from: its checkpoint's (model type and
    its attention biases, RoPE scaling, norms; read once per run, not per reallocation),
    or the one its shape implies (`family.config_json` of the program's full shape)."""
    if spec.checkpoint:
        return dict(_checkpoint_config(spec.checkpoint, spec.head))
    return config_json(spec.shape)


@lru_cache(maxsize=None)
def _checkpoint_config(path: str, head: str) -> dict:
    return checkpoint_config(path, head)


def build_model(spec: ModelSpec, layout: Layout) -> RuntimeModel:
    """The model's home shard: loaded from its checkpoint, or initialised from its shape
    and `init_seed` (0 by default), so same-shaped models start from the same weights."""
    device = device_for_rank()
    if spec.checkpoint:
        module = load_checkpoint(spec.checkpoint, layout, spec.head, device)
    else:
        module = init_random(model_config(spec), layout, spec.head, spec.init_seed, device)
    return RuntimeModel(module, _optimizer(module, spec))


def _optimizer(module: ShardedDecoder, spec: ModelSpec) -> torch.optim.Optimizer | None:
    if not spec.trainable:
        return None
    opt = dict(spec.optimizer or {"name": "adam"})
    name = opt.pop("name")
    if name not in ("adam", "adamw"):
        raise ValueError(f"optimizer {name!r} is not supported (adam, adamw)")
    optimizer = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(module.parameters(), **opt)
    set_adam_state(optimizer, 0.0, {})
    return optimizer


def set_adam_state(optimizer: torch.optim.Optimizer, step: float, moments: dict) -> None:
    """Give every parameter its Adam state: `step` and the moments in `moments` (param ->
    (exp_avg, exp_avg_sq)), zeros where absent. A new optimizer gets zeros at step 0,
    which Adam reads as it would its lazily made state: the moments exist before the
    first backward pass, so the first step's peak is the one the plan priced and a
    device too small fails at start-up, not after a step's work."""
    state, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            avg, avg_sq = moments.get(p) or (torch.zeros_like(p.detach()), torch.zeros_like(p.detach()))
            state[index] = {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": avg, "exp_avg_sq": avg_sq}
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def model_from_shards(spec: ModelSpec, shards: dict, layout: Layout, rank: int) -> RuntimeModel:
    """A model copy in a non-home layout (inference / generation only: no optimizer),
    built directly on `shards` (device and dtype theirs; no second copy)."""
    device = device_for_rank()
    shards = {n: t.to(device) for n, t in shards.items()}  # no-op for reallocated shards
    module = ShardedDecoder.from_shards(ModelConfig.from_hf(model_config(spec)), rank_groups(layout, rank), spec.head,
                                      shards)
    return RuntimeModel(module, None)


def set_precision(model: RuntimeModel, precision: str) -> None:
    """Frozen copies (no optimizer) hold their weights in the call's precision (bf16
    inference and generation copies); trainable ones keep fp32 master weights and
    compute under autocast (`ShardedDecoder.compute`)."""
    dtype = DTYPES[precision]
    if model.optimizer is None and model.module.dtype != dtype:
        with torch.no_grad():
            for p in model.module.parameters():  # one parameter at a time: no second copy of the model
                p.data = p.data.to(dtype)
        model.module.dtype = dtype


def shards_of(model: RuntimeModel) -> dict:
    """HF name -> this rank's shard: what reallocation sends."""
    return model.module.shards()


def load_shards(model: RuntimeModel, shards: dict) -> None:
    """Overwrite a copy in place with reallocated shards."""
    model.module.load_shards(shards)


def param_shapes(spec: ModelSpec) -> dict[str, Param]:
    """Full (unsharded) parameters, shape and tp split (the contract's table):
    reallocation plans from them on every rank."""
    return param_table(shape_from_hf(model_config(spec)), Head(spec.head))


def take_rows(batch: dict, lo: int, hi: int) -> dict:
    """Rows [lo, hi) of a batch: one dp rank's share."""
    return {k: v[lo:hi] for k, v in batch.items()}


def batch_rows(batch: dict) -> int:
    """The row count of a batch (first dimension of its tensors)."""
    return next(iter(batch.values())).shape[0]


def _unwrap(key: str, value: dict):
    """A single-tensor key ({"logp": t}) as its tensor; dict keys (seq, pairs) as dicts."""
    return value[key] if set(value) == {key} else value


def head_outputs(module: ShardedDecoder, h, mb, entropy: bool = False) -> dict:
    """What an interface reads from the model, aligned as `algorithms.ops` says:
    {"logp"} with a zero column 0 for LM heads (and {"entropy"} of the distribution
    each token was drawn from, where asked), {"values"} per token for value heads. The
    LM head runs only where the micro-batch's `response_mask` is 1 (what every LM
    interface reads; 0 elsewhere), over every position when it has none."""
    if module.head == "lm":
        ids = mb["input_ids"]
        targets = mb["response_mask"].reshape(ids.shape) if "response_mask" in mb else None
        logp, ent = next_token_stats(h, ids, targets, entropy)
        return {"logp": logp, "entropy": ent} if entropy else {"logp": logp}
    return {"values": h.values()}


def response_positions(flat: dict) -> dict:
    """The `extra` an inference call's micro-batches carry: its rows' response mask
    ([N, T], pairs flattened), so `head_outputs` runs the LM head there only."""
    if "response_mask" not in flat:
        return {}
    mask = flat["response_mask"]
    return {"response_mask": mask.reshape(-1, mask.shape[-1])}


def step_seed(settings: dict) -> int:
    """A seed that depends on the run's seed and the step only (not on rank or plan),
    so sampling and shuffling agree on every rank and after a resume."""
    return int(settings["seed"]) * 1_000_003 + int(settings["step"])


def first_generated_row(settings: dict, groups) -> int:
    """The global index of this rank's first row of a generate call: dp ranks hold whole
    prompts, and each prompt's `group_size` samples are consecutive rows of the
    `settings["rows"]` (prompts x group) in all."""
    group = int(settings["group_size"])
    first, _ = rows_of(int(settings["rows"]) // group, groups.layout, groups.rank)
    return first * group


def generate_batch(module: ShardedDecoder, prompts: dict, settings: dict, groups, greedy: bool) -> dict:
    """`group_size` samples per prompt (groups are consecutive rows), padded to exactly
    `max_new_tokens` so every dp rank's rows have one shape; `logp` in the aligned
    [B, T] form (zero outside the response), decoded by the call's `engine`. The
    sampling seed depends on (seed, step) only and each row draws by its global index
    (`settings["rows"]` rows in all), so a resumed run, or one under another plan, draws
    the same tokens."""
    group = int(settings["group_size"])
    new = int(settings["max_new_tokens"])
    ids = prompts["input_ids"].repeat_interleave(group, 0) if group > 1 else prompts["input_ids"]
    mask = prompts["attention_mask"].repeat_interleave(group, 0) if group > 1 else prompts["attention_mask"]
    seed = step_seed(settings) * 4099
    params = SamplingParams(
        max_new_tokens=new, greedy=greedy, temperature=float(settings["temperature"]),
        top_k=int(settings["top_k"]), top_p=float(settings["top_p"]), seed=seed,
        first_row=first_generated_row(settings, groups), total_rows=int(settings["rows"]),
        eos_token_id=int(settings["eos_id"]), pad_token_id=int(settings["pad_id"]),
    )
    out = rollout_engine(str(settings["engine"])).generate(module, ids, mask, params, settings)
    missing = new - (out.sequences.shape[1] - out.prompt_len)
    pad = lambda t, value=0: F.pad(t, (0, missing), value=value)  # noqa: E731
    return {
        "seq": {"input_ids": pad(out.sequences, params.pad_token_id), "attention_mask": pad(out.attention_mask),
                "response_mask": pad(out.response_mask)},
        "logp": F.pad(pad(out.logprobs), (out.prompt_len, 0)),
    }


def trainer_logprobs(model: RuntimeModel, spec: ModelSpec, produced: dict, settings: dict,
                     groups) -> tuple[dict, float]:
    """An engine other than the own loop with `rollout_logp = "trainer"`: the rollout's
    `logp` recomputed by the trainer's forward pass over the sampled sequences (the
    ratio's old log-probs, as verl does), as an inference call computes log-probs (packed
    by the call's token budget, the LM head at the response only: what the plan prices),
    and how far the engine's were from them (`logprob_diff`)."""
    seq = produced["seq"]
    mine = run_call("inference", "logprobs", model, spec, {"seq": seq}, ("logp",), settings, groups)[0]["logp"]["logp"]
    return {**produced, "logp": mine}, logprob_diff(produced["logp"], mine, seq["response_mask"])


LOGPROB_DIFF = "logprob_diff"


def metric_key(call: str, stat: str, settings: dict) -> str:
    """The key a call's stat is logged under: `CALL/stat`, but a train call's
    `logprob_diff` (its pre-update forward against the engine log-probs it corrects
    for) under the generate call that sampled them, where the engine's numbers are:
    `gen/logprob_diff` whichever log-probs the rollout keeps (`rollout_logp`)."""
    owner = settings[ENGINE_LOGP_OF] if stat == LOGPROB_DIFF and ENGINE_LOGP_OF in settings else call
    return f"{owner}/{stat}"


def logprob_diff(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, response_mask: torch.Tensor) -> float:
    """The mean |engine - trainer| log-prob over the sampled tokens: the first number to
    read when RL goes wrong (a sync that did not land, a numerics mismatch)."""
    tokens = response_mask.reshape(trainer_logp.shape).to(trainer_logp.dtype)
    return float(((engine_logp.float() - trainer_logp).abs() * tokens).sum() / tokens.sum().clamp(min=1))


def build_loader(name: str, spec: DatasetSpec, seed: int) -> JsonlLoader:
    """A dataset's loader; `field = "x"` names the prompt field, other keys are roles."""
    if not spec.tokenizer:
        raise ValueError(f"dataset {name!r} names no tokenizer (tokenizer = \"…/tokenizer.json\")")
    roles = {("prompt" if role == "field" else role): key for role, key in spec.fields.items()}
    return JsonlLoader(spec.path, load_tokenizer(spec.tokenizer), roles, spec.max_len, seed,
                       fmt=spec.format, chat=spec.chat, system=spec.system, columns=list(spec.columns) or None)


def special_ids(loader: JsonlLoader) -> dict:
    """The token ids calls need from the data's tokenizer (end and padding)."""
    return {"eos_id": loader.tokenizer.eos_token_id, "pad_id": loader.tokenizer.pad_token_id}


def reward_call(spec: ModelSpec, seq: dict, scores: dict, outputs, settings: dict, groups, loader, drawn: list[int]
                ) -> tuple[dict, dict, list]:
    """A reward call on this rank's rows of `seq`: (produced key, metrics, sample rows).
    `scores` are the call's score keys (this rank's rows of each, a reward model's
    per-token values or one number per row). Row r of the call's `rows` global rows came
    from prompt r // group_size of the last batch `drawn` from `loader` (rows keep their
    global order through every move), which gives its dataset row and columns. The first
    rank of each model-parallel group scores (the user's function runs once per row) and
    sends the result to the others."""
    total = int(settings["rows"])
    if not drawn or total % len(drawn):
        raise RuntimeError(f"a reward call of {total} rows does not match the {len(drawn)} prompts drawn")
    group = total // len(drawn)
    lo, hi = rows_of(total, groups.layout, groups.rank)
    leader = groups.mp_ranks[0]
    result: object = None
    if groups.rank == leader:
        try:
            keyed = {k: sequence_score(_unwrap(k, v)).float().tolist() for k, v in scores.items()}
            result = score_rows(spec, seq, loader, [drawn[r // group] for r in range(lo, hi)],
                                lambda: rule_scores(spec.rule, seq, int(settings["max_new_tokens"]),
                                                    int(settings["eos_id"])), keyed,
                                shown={r - lo: r for r in sample_rows(total) if lo <= r < hi})
        except RewardError as e:  # every rank of the group stops with the same message
            result = e
    if len(groups.mp_ranks) > 1:
        box = [result]
        dist.broadcast_object_list(box, src=leader, group=groups.mp)
        result = box[0]
    if isinstance(result, RewardError):
        raise result
    scores, means, samples = result
    mine = samples if groups.rank == leader else []  # each replica's leader: the shown rows it holds
    return {outputs[0]: {outputs[0]: as_tensor(scores, seq["input_ids"])}}, means, mine


def run_call(kind: str, using: str, model: RuntimeModel | None, spec: ModelSpec, batch: dict, outputs, settings: dict,
             groups, generated: list | None = None) -> tuple[dict, dict]:
    """Run one call on this rank's rows: (produced keys, metrics to log). A generate call
    appends to `generated` the log-probs of the rows samples.jsonl shows, from one rank
    of each replica ({"key": its sequences' key, "row", "logprobs"}: `rewards.with_logprobs`)."""
    args = [_unwrap(k, v) for k, v in batch.items()]
    if not spec.neural:
        seq = args[0]
        scores = rule_scores(spec.rule, seq, int(settings["max_new_tokens"]), int(settings["eos_id"]))
        return {outputs[0]: {outputs[0]: scores}}, {}
    n_mbs = int(settings["n_mbs"])
    set_precision(model, str(settings["precision"]))
    model.module.pack = settings["packing"] == "packed"
    if kind == "generate":
        produced = generate_batch(model.module, args[0], settings, groups, greedy=REGISTRY[using].greedy)
        stats = dict(rollout_engine(str(settings["engine"])).stats)
        if trainer_recomputes_rollout(settings):  # else the engine's log-probs stay (`rollout_logp`)
            produced, stats[LOGPROB_DIFF] = trainer_logprobs(model, spec, produced, settings, groups)
        if generated is not None and groups.rank == groups.mp_ranks[0]:  # the replica's ranks hold the same rows
            generated += [{"key": outputs[0], **row} for row in shown_logprobs(
                produced["seq"], produced["logp"], first_generated_row(settings, groups), int(settings["rows"]))]
        names = REGISTRY[using].outputs  # positional: `-> base_seq` may rename "seq"
        # the mean response length: what `rlhfc calibrate` learns the expected `response_len` from
        stats["response_len"] = float(produced["seq"]["response_mask"].sum(1).float().mean())
        return {k: produced[n] if n == "seq" else {k: produced[n]} for k, n in zip(outputs, names)}, stats
    iface = REGISTRY[using]
    flat = bind(using, args)
    if kind == "inference":
        inputs = iface.model_inputs(flat)
        key = "logp" if model.module.head == "lm" else "values"
        with model.module.compute(str(settings["precision"])):
            out = model.module.run_pipeline(inputs["input_ids"], inputs["attention_mask"],
                                            lambda h, mb: head_outputs(model.module, h, mb)[key].float(), n_mbs,
                                            extra=response_positions(flat),
                                            token_budget=int(settings["token_budget"]))
        values = iface.compute({key: out}, flat)
        return {k: {k: v} for k, v in zip(outputs, values)}, {}
    checked = {}
    if recomputes_old_logp(settings):  # off_policy: the policy before this call's updates, one forward
        old, _ = run_call("inference", "logprobs", model, spec, {"seq": flat}, (OLD_LOGP,), settings, groups)
        flat[OLD_LOGP] = old[OLD_LOGP][OLD_LOGP]
        if ENGINE_LOGP_OF in settings:  # the rollout's logp is an engine's (`rollout_logp = "engine"`)
            checked = {LOGPROB_DIFF: logprob_diff(flat["logp"], flat[OLD_LOGP], flat["response_mask"])}
    return {}, {**_train(iface, model, flat, settings, groups, n_mbs), **checked}


def _train(iface, model: RuntimeModel, flat: dict, settings: dict, groups, n_mbs: int) -> dict:
    """`ppo_epochs` passes over the batch, each shuffled (seeded by seed, step and epoch:
    the same on every rank) into `mini_batches` optimizer steps. `prepare` sees the whole
    batch once (group baselines and batch-level whitening need it), gathered over the dp
    group; the rollout's log-probs stay the old policy. Metrics are averaged over the
    optimizer steps (`train_steps` says how many)."""
    whole = _gather_rows(flat, groups)
    hyper = dict(settings)
    if "kl_target" in hyper:  # the adaptive (or fixed) KL coefficient of this step
        if model.adaptive_kl is None:
            model.adaptive_kl = AdaptiveKL(hyper["kl_coef"], hyper["kl_target"], hyper["kl_horizon"])
        hyper["kl_coef"] = model.adaptive_kl.coef
    prepared = iface.prepare(whole, hyper)
    extra_metrics = {}
    if "kl_target" in hyper:
        extra_metrics["kl_coef"] = hyper["kl_coef"]
        model.adaptive_kl.update(rollout_kl(whole), batch_rows(whole))
    epochs, n_mini = int(hyper["ppo_epochs"]), int(hyper["mini_batches"])
    n = batch_rows(prepared)
    if n_mini > n:
        raise ValueError(f"mini_batches = {n_mini} exceeds the call's {n} rows")
    per_call = epochs * n_mini
    totals: dict[str, float] = {}
    for epoch in range(epochs):
        order = _shuffled(n, hyper, epoch) if per_call > 1 else torch.arange(n)
        for k, part in enumerate(order.tensor_split(n_mini)):
            update = (int(hyper["step"]) * per_call) + epoch * n_mini + k
            mini = iface.weigh({key: v[part.to(v.device)] for key, v in prepared.items()}, hyper)
            factor = lr_factor(str(hyper["lr_schedule"]), update, int(hyper["steps"]) * per_call,
                               int(hyper["warmup_steps"]))
            for key, value in _step(iface, model, mini, hyper, groups, n_mbs, factor).items():
                totals[key] = totals.get(key, 0.0) + value / per_call
    model.optimizer.zero_grad(set_to_none=True)  # between calls a copy holds weights and Adam state only
    return {**totals, **extra_metrics, "train_steps": float(per_call)}


def _shuffled(n: int, hyper: dict, epoch: int) -> torch.Tensor:
    """A permutation of the call's rows that depends on (seed, step, epoch) only."""
    gen = torch.Generator().manual_seed(step_seed(hyper) * 64 + epoch)
    return torch.randperm(n, generator=gen)


def _step(iface, model: RuntimeModel, mini: dict, hyper: dict, groups, n_mbs: int, lr_scale: float) -> dict:
    """One optimizer step on this dp rank's rows of a weighed mini-batch (every rank holds
    all of it: ranks take rows balanced by their tokens, `budget.balanced`), through the
    model's one train step (forward, backward, dp all-reduce, global-norm clipping,
    update). The loss is a contribution, so the dp-averaged gradient is rescaled to the
    sum; returns the step's metrics (contributions times dp: the engine averages ranks)."""
    n = batch_rows(mini)
    tokens = iface.model_inputs(mini)["attention_mask"].reshape(n, -1).sum(1).tolist()
    picked = torch.tensor(balanced(tokens, groups.layout.dp, groups.dp_rank), dtype=torch.long)
    mine = {k: v[picked.to(v.device)] for k, v in mini.items()}
    inputs = iface.model_inputs(mine)
    rows = inputs["input_ids"].shape[0]
    dp = groups.layout.dp
    metrics: dict[str, float] = {}

    def loss_fn(h, mb):
        loss, m = iface.loss(_fp32(head_outputs(model.module, h, mb, iface.entropy)), mb, hyper)
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
        # run_pipeline weights a micro-batch's mean by its row share; undo that, and
        # undo reduce_gradients' dp average: contributions must be summed.
        return loss * (rows / mb["input_ids"].shape[0]) * dp

    for group in model.optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * lr_scale
    extra = {k: v for k, v in mine.items() if k not in ("input_ids", "attention_mask")}
    clip = float(hyper["max_grad_norm"]) or None
    loss = model.module.train_step(inputs["input_ids"], inputs["attention_mask"], loss_fn, model.optimizer,
                                   n_mbs, extra, max_grad_norm=clip, precision=str(hyper["precision"]),
                                   schedule="1f1b", recompute=bool(hyper["recompute"]),
                                   token_budget=int(hyper["token_budget"]))
    return {**{k: v * dp for k, v in metrics.items()}, "loss": float(loss), "lr": model.optimizer.param_groups[0]["lr"]}


def _fp32(outputs: dict) -> dict:
    """Losses and advantages in fp32 whatever the compute precision."""
    return {k: v.float() for k, v in outputs.items()}


def _gather_rows(batch: dict, groups) -> dict:
    """The whole batch of a layout, from the rows of every dp rank."""
    if groups.layout.dp == 1:
        return batch
    return all_gather_rows(batch, groups.dp, groups.layout.dp)
