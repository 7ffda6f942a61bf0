"""How the engine runs one call: the glue between the op program and the runtime's
pieces (sharded models, the interface registry, generation, data loaders).

Data convention: every data key holds a dict of tensors whose first dimension is the
batch row (`seq` as `algorithms.batch` describes it; a per-token tensor such as `logp`
as {"logp": tensor}), so `transfer.redistribute_batch` can move any key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rlhfc_runtime.algorithms.registry import REGISTRY, bind, rule_scores
from rlhfc_runtime.checkpoint import init_random, load_checkpoint, tiny_config
from rlhfc_runtime.data.loaders import JsonlLoader
from rlhfc_runtime.data.tokenizer import load_tokenizer
from rlhfc_runtime.dist import device_for_rank, rank_groups
from rlhfc_runtime.generate import SamplingParams, generate
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.model import ShardedLlama, next_token_logprobs
from rlhfc_runtime.model import param_shapes as model_param_shapes
from rlhfc_runtime.model import ModelConfig
from rlhfc_runtime.rewards import RewardError, as_tensor, score_rows
from rlhfc_runtime.transfer import rows_of


@dataclass
class RuntimeModel:
    """A model's shard on this rank in one layout, with its optimizer if it trains here."""

    module: ShardedLlama
    optimizer: torch.optim.Optimizer | None


def hf_config(spec: dict) -> dict:
    """The config.json dict of an inline-shaped model."""
    s = spec["shape"]
    return tiny_config(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_kv_heads"], max_position_embeddings=s["max_positions"],
        tie_word_embeddings=s["tied_embeddings"],
    )


def build_model(spec: dict, layout: Layout) -> RuntimeModel:
    """The model's home shard: loaded from its checkpoint, or initialised from its shape
    and `init_seed` (0 by default), so same-shaped models start from the same weights."""
    device = device_for_rank()
    if spec["checkpoint"]:
        module = load_checkpoint(spec["checkpoint"], layout, spec["head"], device)
    else:
        module = init_random(hf_config(spec), layout, spec["head"], int(spec.get("init_seed", 0)), device)
    return RuntimeModel(module, _optimizer(module, spec))


def _optimizer(module: ShardedLlama, spec: dict) -> torch.optim.Optimizer | None:
    if not spec["trainable"]:
        return None
    opt = dict(spec["optimizer"] or {"name": "adam"})
    name = opt.pop("name")
    if name not in ("adam", "adamw"):
        raise ValueError(f"optimizer {name!r} is not supported (adam, adamw)")
    return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(module.parameters(), **opt)


def model_from_shards(spec: dict, shards: dict, layout: Layout, rank: int) -> RuntimeModel:
    """A model copy in a non-home layout (inference / generation only: no optimizer)."""
    module = ShardedLlama(ModelConfig.from_hf(hf_config(spec)), rank_groups(layout, rank), spec["head"],
                          device_for_rank())
    module.load_shards(shards)
    return RuntimeModel(module, None)


def shards_of(model: RuntimeModel) -> dict:
    """HF name -> this rank's shard: what reallocation sends."""
    return model.module.shards()


def load_shards(model: RuntimeModel, shards: dict) -> None:
    """Overwrite a copy in place with reallocated shards."""
    model.module.load_shards(shards)


def param_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) parameter shapes: reallocation plans from them on every rank."""
    return model_param_shapes(ModelConfig.from_hf(hf_config(spec)), spec["head"])


def model_state(model: RuntimeModel) -> dict:
    """Parameters and optimizer state of a home shard, for a checkpoint."""
    return {"shards": {n: t.clone() for n, t in model.module.shards().items()},
            "optimizer": model.optimizer.state_dict() if model.optimizer else None}


def load_model_state(model: RuntimeModel, state: dict) -> None:
    """Restore what `model_state` saved (resume)."""
    model.module.load_shards(state["shards"])
    if model.optimizer:
        model.optimizer.load_state_dict(state["optimizer"])


def take_rows(batch: dict, lo: int, hi: int) -> dict:
    """Rows [lo, hi) of a batch: one dp rank's share."""
    return {k: v[lo:hi] for k, v in batch.items()}


def batch_rows(batch: dict) -> int:
    """The row count of a batch (first dimension of its tensors)."""
    return next(iter(batch.values())).shape[0]


def _unwrap(key: str, value: dict):
    """A single-tensor key ({"logp": t}) as its tensor; dict keys (seq, pairs) as dicts."""
    return value[key] if set(value) == {key} else value


def head_outputs(module: ShardedLlama, h, mb) -> dict:
    """What an interface reads from the model, aligned as `algorithms.ops` says:
    {"logp"} with a zero column 0 for LM heads, {"values"} per token for value heads."""
    if module.head == "lm":
        return {"logp": F.pad(next_token_logprobs(h, mb["input_ids"]), (1, 0))}
    return {"values": h.values()}


def generate_batch(module: ShardedLlama, prompts: dict, settings: dict, groups, greedy: bool) -> dict:
    """`group_size` samples per prompt (groups are consecutive rows), padded to exactly
    `max_new_tokens` so every dp rank's rows have one shape; `logp` in the aligned
    [B, T] form (zero outside the response). The sampling seed depends on (seed, step)
    only and each row draws by its global index (`settings["rows"]` rows in all), so a
    resumed run, or one under another plan, draws the same tokens."""
    group = int(settings["group_size"])
    new = int(settings["max_new_tokens"])
    ids = prompts["input_ids"].repeat_interleave(group, 0) if group > 1 else prompts["input_ids"]
    mask = prompts["attention_mask"].repeat_interleave(group, 0) if group > 1 else prompts["attention_mask"]
    seed = (int(settings["seed"]) * 1_000_003 + int(settings["step"])) * 4099
    total = int(settings["rows"])  # rows this call makes in all: prompts x group
    first, _ = rows_of(total // group, groups.layout, groups.rank)  # dp ranks hold whole prompts
    params = SamplingParams(
        max_new_tokens=new, greedy=greedy, temperature=float(settings["temperature"]),
        top_k=int(settings["top_k"]), top_p=float(settings["top_p"]), seed=seed,
        first_row=first * group, total_rows=total,
        eos_token_id=int(settings["eos_id"]), pad_token_id=int(settings["pad_id"]),
    )
    out = generate(module, ids, mask, params)
    missing = new - (out.sequences.shape[1] - out.prompt_len)
    pad = lambda t, value=0: F.pad(t, (0, missing), value=value)  # noqa: E731
    return {
        "seq": {"input_ids": pad(out.sequences, params.pad_token_id), "attention_mask": pad(out.attention_mask),
                "response_mask": pad(out.response_mask)},
        "logp": F.pad(pad(out.logprobs), (out.prompt_len, 0)),
    }


def build_loader(name: str, spec: dict, seed: int) -> JsonlLoader:
    """A dataset's loader; `field = "x"` names the prompt field, other keys are roles."""
    if not spec["tokenizer"]:
        raise ValueError(f"dataset {name!r} names no tokenizer (tokenizer = \"…/tokenizer.json\")")
    roles = {("prompt" if role == "field" else role): key for role, key in spec["fields"].items()}
    return JsonlLoader(spec["path"], load_tokenizer(spec["tokenizer"]), roles, int(spec["max_len"]), seed,
                       fmt=spec["format"], chat=bool(spec.get("chat")), system=spec.get("system"),
                       columns=spec.get("columns") or None)


def special_ids(loader: JsonlLoader) -> dict:
    """The token ids calls need from the data's tokenizer (end and padding)."""
    return {"eos_id": loader.tokenizer.eos_token_id, "pad_id": loader.tokenizer.pad_token_id}


def reward_call(spec: dict, seq: dict, outputs, settings: dict, groups, loader, drawn: list[int]
                ) -> tuple[dict, dict, list]:
    """A reward call on this rank's rows of `seq`: (produced key, metrics, sample rows).
    Row r of the call's `rows` global rows came from prompt r // group_size of the last
    batch `drawn` from `loader` (rows keep their global order through every move), which
    gives its dataset row and columns. The first rank of each model-parallel group scores
    (the user's function runs once per row) and sends the result to the others."""
    total = int(settings["rows"])
    if not drawn or total % len(drawn):
        raise RuntimeError(f"a reward call of {total} rows does not match the {len(drawn)} prompts drawn")
    group = total // len(drawn)
    lo, hi = rows_of(total, groups.layout, groups.rank)
    leader = groups.mp_ranks[0]
    result: object = None
    if groups.rank == leader:
        try:
            result = score_rows(spec, seq, loader, [drawn[r // group] for r in range(lo, hi)],
                                lambda: rule_scores(spec["rule"], seq, int(settings["max_new_tokens"]),
                                                    int(settings["eos_id"])))
        except RewardError as e:  # every rank of the group stops with the same message
            result = e
    if len(groups.mp_ranks) > 1:
        box = [result]
        dist.broadcast_object_list(box, src=leader, group=groups.mp)
        result = box[0]
    if isinstance(result, RewardError):
        raise result
    scores, means, samples = result
    mine = samples if groups.rank == leader and groups.dp_rank == 0 else []
    return {outputs[0]: {outputs[0]: as_tensor(scores, seq["input_ids"])}}, means, mine


def run_call(kind: str, using: str, model: RuntimeModel | None, spec: dict, batch: dict, outputs, settings: dict,
             groups) -> tuple[dict, dict]:
    """Run one call on this rank's rows: (produced keys, metrics to log)."""
    args = [_unwrap(k, v) for k, v in batch.items()]
    n_mbs = int(settings["n_mbs"])
    if spec["kind"] == "rule":
        seq = args[0]
        scores = rule_scores(spec["rule"], seq, int(settings["max_new_tokens"]), int(settings["eos_id"]))
        return {outputs[0]: {outputs[0]: scores}}, {}
    if kind == "generate":
        produced = generate_batch(model.module, args[0], settings, groups, greedy=REGISTRY[using].greedy)
        names = REGISTRY[using].outputs  # positional: `-> base_seq` may rename "seq"
        return {k: produced[n] if n == "seq" else {k: produced[n]} for k, n in zip(outputs, names)}, {}
    iface = REGISTRY[using]
    flat = bind(using, args)
    if kind == "inference":
        inputs = iface.model_inputs(flat)
        key = "logp" if model.module.head == "lm" else "values"
        out = model.module.run_pipeline(inputs["input_ids"], inputs["attention_mask"],
                                        lambda h, mb: head_outputs(model.module, h, mb)[key], n_mbs)
        values = iface.compute({key: out}, flat)
        return {k: {k: v} for k, v in zip(outputs, values)}, {}
    return {}, _train(iface, model, flat, settings, groups, n_mbs)


def _train(iface, model: RuntimeModel, flat: dict, settings: dict, groups, n_mbs: int) -> dict:
    """One optimizer step on this dp rank's rows. `prepare` sees the whole batch (group
    baselines and batch-level weights need it), gathered over the dp group; the loss is
    a contribution, so the dp-averaged gradient is rescaled to the sum."""
    whole = _gather_rows(flat, groups)
    prepared = iface.prepare(whole, settings)
    lo, hi = rows_of(batch_rows(whole), groups.layout, groups.rank)
    mine = take_rows(prepared, lo, hi)
    inputs = iface.model_inputs(mine)
    rows = inputs["input_ids"].shape[0]
    dp = groups.layout.dp
    metrics: dict[str, list] = {}

    def loss_fn(model_outputs, mb):
        loss, m = iface.loss(model_outputs, mb, settings)
        for k, v in m.items():
            metrics.setdefault(k, []).append(float(v))
        # run_pipeline weights a micro-batch's mean by its row share; undo that, and
        # undo reduce_gradients' dp average: contributions must be summed.
        return loss * (rows / mb["input_ids"].shape[0]) * dp

    extra = {k: v for k, v in mine.items() if k not in ("input_ids", "attention_mask")}
    model.optimizer.zero_grad(set_to_none=True)
    loss = model.module.run_pipeline(inputs["input_ids"], inputs["attention_mask"],
                                     lambda h, mb: loss_fn(head_outputs(model.module, h, mb), mb), n_mbs, extra,
                                     backward=True)
    model.module.reduce_gradients()
    model.optimizer.step()
    # Contributions summed over micro-batches, times dp: the engine averages over ranks.
    return {**{k: sum(v) * dp for k, v in metrics.items()}, "loss": float(loss)}


def _gather_rows(batch: dict, groups) -> dict:
    """The whole batch of a layout, from the rows of every dp rank (tiny data: objects)."""
    if groups.layout.dp == 1:
        return batch
    parts = [None] * groups.layout.dp
    dist.all_gather_object(parts, {k: v.cpu() for k, v in batch.items()}, group=groups.dp)
    device = next(iter(batch.values())).device
    return {k: torch.cat([p[k] for p in parts]).to(device) for k in batch}
