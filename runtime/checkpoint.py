"""Hugging Face checkpoints in and out of sharded models.

Loading reads only this rank's slices (`safe_open(...).get_slice`), from a single
model.safetensors or a sharded model.safetensors.index.json; saving streams each full
tensor to one writer of the mesh (`hf_stream`: no rank gathers the model) and writes
safetensors files, their index and config.json that `transformers` loads. Tiny random models are generated per parameter
from (seed, name), so they are the same whatever the layout.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlhfc_runtime import hf_stream
from rlhfc_runtime.contract.atomic import write_atomic, write_error
from rlhfc_runtime.dist import rank_groups
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.contract.shapes import param_table
from rlhfc_runtime.contract.family import fused, hf_class, shape_from_hf
from rlhfc_runtime.model import LM, VALUE, ModelConfig, ShardedDecoder, param_shapes


def tiny_config(**overrides) -> dict:
    """A small LLaMA config.json dict (GQA: 4 heads, 2 kv heads) for tests and examples."""
    cfg = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "initializer_range": 0.02, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    cfg.update(overrides)
    return cfg


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint directory."""
    return json.loads((Path(path) / "config.json").read_text())


def head_of(cfg: dict) -> str:
    """'value' for token-classification checkpoints (critic / reward), else 'lm'."""
    archs = cfg.get("architectures") or []
    return VALUE if any(a.endswith("ForTokenClassification") for a in archs) else LM


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """Init of one full parameter: norm weights 1, all others N(0, std) (biases too,
    unlike HF's zeros, so tests exercise them), seeded by (seed, name) so any shard of
    it can be made without the others."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * std


def write_random_checkpoint(path: str | Path, cfg: dict, seed: int = 0, head: str = LM) -> Path:
    """Write a deterministic random HF checkpoint (config.json + model.safetensors)."""
    mc = ModelConfig.from_hf(cfg)
    std = cfg.get("initializer_range", 0.02)
    tensors = {n: random_tensor(_tied_source(mc, n), s, seed, std) for n, s in param_shapes(mc, head).items()}
    return _write(Path(path), cfg, head, tensors)


def _tied_source(cfg: ModelConfig, name: str) -> str:
    """The parameter whose values `name` has: a tied lm_head is the embedding."""
    return "model.embed_tokens.weight" if cfg.shape.tied_embeddings and name == "lm_head.weight" else name


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of parameters of at most max_bytes each (a larger tensor
    gets a file of its own), as transformers shards checkpoints."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if parts[-1] and size + nbytes > max_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = t
        size += nbytes
    return parts


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written beside `path`, checked complete, synced and renamed over
    it. safetensors does not report a full disk (it leaves a short file), so the size is
    checked against the header: on any failure the temp file is removed and an OSError
    names `path` and the bytes needed."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            os.fsync(f.fileno())
        if os.stat(tmp).st_size != 8 + header + need:
            raise OSError(errno.ENOSPC, "written short")
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - safetensors raises SafetensorError, no OSError
        tmp.unlink(missing_ok=True)
        raise write_error(err if isinstance(err, OSError) else OSError(errno.EIO, str(err)), path, need) from None


def fuse(shape, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's own tensors from the table's: a family's fused tensors (Phi-3's
    qkv_proj, gate_up_proj) are the concatenation of their parts, in place of them."""
    rules = fused(shape)
    if not rules:
        return tensors
    out = dict(tensors)
    for n in range(shape.n_layers):
        for rule in rules:
            names = [f"model.layers.{n}.{part}" for part in rule.parts]
            if all(name in out for name in names):
                out[f"model.layers.{n}.{rule.name}"] = torch.cat([out.pop(name) for name in names], dim=rule.dim)
    return out


def _write(path: Path, cfg: dict, head: str, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shape = shape_from_hf(cfg)
    if shape.tied_embeddings:  # as transformers saves tied models
        tensors = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    tensors = fuse(shape, tensors)
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    parts = _split(tensors, max_shard_bytes) if max_shard_bytes else [tensors]
    if len(parts) == 1:
        save_tensors(path / "model.safetensors", tensors)
    else:
        weight_map = {}
        for i, part in enumerate(parts, 1):
            file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            save_tensors(path / file, part)
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(path / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
    write_atomic(path / "config.json", hf_config(cfg, head))
    return path


def hf_config(cfg: dict, head: str) -> bytes:
    """config.json of an exported checkpoint: its own class, a value head's labels."""
    out = dict(cfg, architectures=[hf_class(shape_from_hf(cfg), head == VALUE)])
    if head == VALUE:
        out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return (json.dumps(out, indent=2, sort_keys=True) + "\n").encode()


# Value heads as the trainers that write them name them: transformers' *ForSequenceClassification
# and *ForTokenClassification (`score`), OpenRLHF (`value_head`), TRL (`v_head.summary`).
VALUE_HEAD_PREFIXES = ("score.", "value_head.", "v_head.summary.")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: named tensors missing, unused or misplaced."""

    located = True


def hf_name(key: str) -> str:
    """The model's name for a checkpoint key: value heads become `score.*`, a TRL
    wrapper's `pretrained_model.` prefix goes, bare backbone keys get `model.`."""
    for prefix in VALUE_HEAD_PREFIXES:
        if key.startswith(prefix):
            return "score." + key[len(prefix):]
    key = key.removeprefix("pretrained_model.")
    return key if key.startswith(("model.", "lm_head.")) else "model." + key


def weight_index(path: str | Path, cfg: dict | None = None) -> dict[str, tuple[Path, str, int]]:
    """HF parameter name -> (safetensors file, key in that file, first row of it), from
    a single file or a sharded index. Bare backbone keys (`layers.0…`, as LlamaModel
    saves them) map to `model.layers.0…`; a tied model's missing lm_head maps to the
    embedding; a family's fused tensors map each part to its rows (`unfuse`). `cfg`:
    the checkpoint's config.json when the caller has read it already."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        raw = {n: path / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    elif (path / "model.safetensors").exists():
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            raw = {n: path / "model.safetensors" for n in f.keys()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for key, file in raw.items():
        if not key.endswith(IGNORED_SUFFIXES):
            out[hf_name(key)] = (file, key, 0)
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return _unfuse(out, shape_from_hf(read_config(path) if cfg is None else cfg))


def _unfuse(index: dict, shape) -> dict:
    """Each part of a fused checkpoint tensor as the rows of it that it is."""
    table = param_table(shape)
    for n in range(shape.n_layers):
        for rule in fused(shape):
            whole = index.pop(f"model.layers.{n}.{rule.name}", None)
            if whole is None:
                continue
            row = 0
            for part in rule.parts:
                name = f"model.layers.{n}.{part}"
                index[name] = (whole[0], whole[1], row)
                row += table[name].shape[rule.dim]
    return index


def checkpoint_config(path: str | Path, head: str) -> dict:
    """config.json of a checkpoint as a `head` model is built from it (architecture,
    attention biases, RoPE base: every copy of the model in any layout must agree): a
    value head's bias is the checkpoint's own."""
    cfg = read_config(path)
    return _head_config(cfg, weight_index(path, cfg), head)


def _head_config(cfg: dict, index: dict, head: str) -> dict:
    """`cfg` with the value head's bias as the checkpoint `index` has it."""
    if head == VALUE and any(n.startswith("score.") for n in index):
        return dict(cfg, token_classification_bias="score.bias" in index)
    return cfg


def load_checkpoint(
    path: str | Path, layout: Layout, head: str | None = None, device=None,
    dtype=torch.float32, seed: int = 0,
) -> ShardedDecoder:
    """Build this rank's shard of the model in checkpoint `path` under `layout`, reading
    only its slices. Every model tensor must be in the checkpoint and every checkpoint
    tensor used (CheckpointError names them), except: a value head asked for on a causal
    LM (a critic started from the actor) is initialised from `seed`, and a value-head
    model drops an LM head beside its value head (TRL); both are logged."""
    raw = read_config(path)  # one read of config.json and one scan of the weight files
    head = head or head_of(raw)
    index = weight_index(path, raw)
    cfg = _head_config(raw, index, head)
    has_head = any(n.startswith("score.") for n in index)
    if head == LM and has_head:
        key = next(k for n, (_, k, _) in index.items() if n.startswith("score."))
        raise CheckpointError(f"{path}: the checkpoint has a value head (`{key}`) but the model is loaded as a "
                              f"language model; declare it with `head = value`")
    model = ShardedDecoder(ModelConfig.from_hf(cfg), rank_groups(layout), head, device, dtype)
    full = param_shapes(model.cfg, head)
    _check_names(path, index, full, head, has_head)
    if head == VALUE and not has_head:
        print(f"rlhfc: {path}: causal-LM checkpoint loaded with head = value: the value head is new "
              f"(initialised from seed {seed})", file=sys.stderr)
    shards = {}
    for name in model.shards():
        if name in index:
            file, key, row = index[name]
            sl = model.slices(name)
            if row:  # a part of a fused tensor: its rows start at `row`
                sl = (slice(sl[0].start + row, sl[0].stop + row), *sl[1:])
            with safe_open(str(file), "pt") as f:
                shards[name] = f.get_slice(key)[sl]
        else:  # a value head on purpose (checked above)
            shards[name] = random_tensor(name, full[name], seed, cfg.get("initializer_range", 0.02))[model.slices(name)]
    model.load_shards({n: t.to(dtype) for n, t in shards.items()})
    return model


def _check_names(path, index: dict, full: dict, head: str, has_head: bool) -> None:
    missing = [n for n in full if n not in index and not (head == VALUE and not has_head and n.startswith("score."))]
    tied = "lm_head.weight" in index and index["lm_head.weight"] == index.get("model.embed_tokens.weight")
    spare = {"lm_head.weight"} if head == VALUE else set()
    unused = [index[n][1] for n in index if n not in full and n not in spare and not (tied and n == "lm_head.weight")]
    if missing or unused:
        parts = ([f"model tensor(s) missing from the checkpoint: {', '.join(missing[:5])}"] if missing else []) + (
            [f"checkpoint tensor(s) the model does not use: {', '.join(unused[:5])}"] if unused else [])
        raise CheckpointError(f"{path}: {'; '.join(parts)} (is this checkpoint of this model's shape and head?)")


def init_random(cfg: dict, layout: Layout, head: str = LM, seed: int = 0, device=None, dtype=torch.float32) -> ShardedDecoder:
    """This rank's shard of the random model `write_random_checkpoint` would write."""
    model = ShardedDecoder(ModelConfig.from_hf(cfg), rank_groups(layout), head, device, dtype)
    full = param_shapes(model.cfg, head)
    std = cfg.get("initializer_range", 0.02)
    model.load_shards({
        n: random_tensor(_tied_source(model.cfg, n), full[n], seed, std)[model.slices(n)].to(dtype)
        for n in model.shards()
    })
    return model


def save_checkpoint(model: ShardedDecoder, path: str | Path, max_shard_bytes: int | None = None) -> Path | None:
    """Write the full model as an HF checkpoint, streamed by the writers `hf_stream`
    plans (no rank gathers the model); collective over the model's mesh. Returns the path
    on the mesh's first rank (which writes the index and config.json last), None
    elsewhere; files of at most max_shard_bytes come with a model.safetensors.index.json."""
    path = Path(path)
    plan = hf_stream.plan_of(model, max_shard_bytes or hf_stream.MAX_SHARD_BYTES)
    hf_stream.prepare_dir(model, path, fresh=False)
    problem = hf_stream.agree(model, hf_stream.stream(model, path, plan))
    if problem is not None:
        raise problem
    if model.groups.rank != model.groups.layout.ranks[0]:
        return None
    hf_stream.write_index(path, plan, torch.empty((), dtype=model.dtype).element_size())
    write_atomic(path / "config.json", hf_config(model.cfg.hf, model.head))
    return path
