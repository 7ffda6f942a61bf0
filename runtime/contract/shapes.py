"""Model shapes and the one parameter table.

`ModelShape` is everything about a model that anyone needs: sizes, and the switches of a
decoder family's forward pass (norm placement, q/k norms, biases, RoPE, windows,
soft-capping, ...). `TABLE` is the parameter inventory of every supported family, written
once: each row is an HF parameter name, its shape in the shape's dimensions, the dimension
tensor parallelism splits (None: replicated), where it lives in a pipeline, and the switch
that turns it on. Parameter shapes, counts, tp split dimensions, per-stage counts (the cost
model's) and the shard intervals of `layout.shard_slices` are all derived from it.

Pure Python, no torch: the compiler imports it too.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import lru_cache

from rlhfc_runtime.contract.kinds import Head


class Scope(enum.Enum):
    """Where a parameter lives: which pipeline stage holds it follows from this."""

    EMBED = "embed"  # first stage
    LAYER = "layer"  # the stage that holds its decoder layer
    FINAL = "final"  # last stage (final norm)
    LM_HEAD = "lm_head"  # last stage, language-model head only
    VALUE_HEAD = "value_head"  # last stage, value head only


@dataclass(frozen=True)
class Row:
    """One parameter of the table. `name` is relative to `model.layers.N.` for LAYER rows;
    `dims` name `ModelShape` sizes; `when` names a `ModelShape.has(...)` switch.
    `tp_partial`: replicated, but each tp rank applies it to its own heads only, so its
    gradient is the sum over the tp group (per-head q/k norms)."""

    name: str
    dims: tuple[str, ...]
    split: int | None
    scope: Scope
    when: str = ""
    tp_partial: bool = False


_L = Scope.LAYER
TABLE: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", ("vocab", "hidden"), 0, Scope.EMBED),
    Row("input_layernorm.weight", ("hidden",), None, _L, "input_norm"),
    Row("self_attn.q_proj.weight", ("q", "hidden"), 0, _L),
    Row("self_attn.q_proj.bias", ("q",), 0, _L, "qkv_bias"),
    Row("self_attn.k_proj.weight", ("kv", "hidden"), 0, _L),
    Row("self_attn.k_proj.bias", ("kv",), 0, _L, "qkv_bias"),
    Row("self_attn.v_proj.weight", ("kv", "hidden"), 0, _L),
    Row("self_attn.v_proj.bias", ("kv",), 0, _L, "qkv_bias"),
    Row("self_attn.o_proj.weight", ("hidden", "q"), 1, _L),
    Row("self_attn.o_proj.bias", ("hidden",), None, _L, "o_bias"),  # added once, after the tp reduce
    Row("self_attn.q_norm.weight", ("head_dim",), None, _L, "head_qk_norm", True),  # Qwen3, Gemma 3: per head
    Row("self_attn.k_norm.weight", ("head_dim",), None, _L, "head_qk_norm", True),
    Row("self_attn.q_norm.weight", ("q",), 0, _L, "full_qk_norm"),  # OLMo 2: over all heads
    Row("self_attn.k_norm.weight", ("kv",), 0, _L, "full_qk_norm"),
    Row("post_attention_layernorm.weight", ("hidden",), None, _L),
    Row("pre_feedforward_layernorm.weight", ("hidden",), None, _L, "sandwich_norm"),
    Row("post_feedforward_layernorm.weight", ("hidden",), None, _L, "post_mlp_norm"),
    Row("mlp.gate_proj.weight", ("intermediate", "hidden"), 0, _L),
    Row("mlp.gate_proj.bias", ("intermediate",), 0, _L, "mlp_bias"),
    Row("mlp.up_proj.weight", ("intermediate", "hidden"), 0, _L),
    Row("mlp.up_proj.bias", ("intermediate",), 0, _L, "mlp_bias"),
    Row("mlp.down_proj.weight", ("hidden", "intermediate"), 1, _L),
    Row("mlp.down_proj.bias", ("hidden",), None, _L, "mlp_bias"),
    Row("model.norm.weight", ("hidden",), None, Scope.FINAL),
    Row("lm_head.weight", ("vocab", "hidden"), 0, Scope.LM_HEAD),
    Row("score.weight", ("one", "hidden"), None, Scope.VALUE_HEAD),
    Row("score.bias", ("one",), None, Scope.VALUE_HEAD, "score_bias"),
)

NORMS = ("pre", "sandwich", "post")  # LLaMA; Gemma 2/3 (pre and post both); OLMo 2 (post only)


@dataclass(frozen=True)
class ModelShape:
    """A decoder model as the compiler and the runtime both see it: its sizes, as in a
    Hugging Face config.json, and the switches of its family's forward pass."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 4096
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, attention_bias: q, k and v projections have biases
    family: str = "llama"  # the config.json model_type (`family.FAMILIES`)
    head_dim: int = 0  # 0: hidden // n_heads (Qwen3, Gemma and Mistral set their own)
    o_bias: bool = False  # attention_bias: the output projection too
    mlp_bias: bool = False
    qk_norm: str = ""  # "", "head" (RMSNorm over each head), "full" (over all heads)
    norm: str = "pre"  # one of NORMS
    norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w)
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" or "gelu_tanh", gated (SwiGLU / GeGLU)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden)
    attn_softcap: float = 0.0  # Gemma 2: tanh soft-capping of attention scores (0: off)
    final_softcap: float = 0.0  # Gemma 2: of the final logits
    query_scale: float = 0.0  # attention scale 1/sqrt(query_scale) (0: head_dim)
    windows: tuple[int, ...] = ()  # per layer: sliding-window length, 0 for full attention (): all full
    nope_layers: tuple[int, ...] = ()  # layers that apply no RoPE (SmolLM3)
    rotary_fraction: float = 1.0  # fraction of head_dim RoPE rotates (Phi-4-mini: 0.75)
    fused_checkpoint: bool = False  # Phi-3: qkv_proj / gate_up_proj in the checkpoint
    score_bias: bool = True  # the value head's bias (HF token classification has one)

    def __post_init__(self):  # from JSON too (cost inputs, the program): lists become tuples
        object.__setattr__(self, "windows", tuple(self.windows))
        object.__setattr__(self, "nope_layers", tuple(self.nope_layers))
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)

    def has(self, switch: str) -> bool:
        """Whether a table row's `when` switch is on for this model."""
        return {
            "": True, "qkv_bias": self.qkv_bias, "o_bias": self.o_bias, "mlp_bias": self.mlp_bias,
            "head_qk_norm": self.qk_norm == "head", "full_qk_norm": self.qk_norm == "full",
            "input_norm": self.norm != "post", "sandwich_norm": self.norm == "sandwich",
            "post_mlp_norm": self.norm != "pre", "score_bias": self.score_bias,
        }[switch]

    def size(self, dim: str) -> int:
        return {
            "vocab": self.vocab, "hidden": self.hidden, "intermediate": self.intermediate, "one": 1,
            "head_dim": self.head_dim, "q": self.n_heads * self.head_dim, "kv": self.n_kv_heads * self.head_dim,
        }[dim]

    def param_count(self, head: Head = Head.LM) -> int:
        """Parameters of the model with `head` (a tied LM head counted once): exact, so
        memory estimates are exact."""
        counts = inventory(self, head)
        out = 0 if self.tied_embeddings and head is Head.LM else counts.head
        return self.n_layers * (counts.layer_split + counts.layer_replicated) + counts.embed + counts.final + out


@dataclass(frozen=True)
class Param:
    """One full parameter of a model: its shape, tp split dimension and where it lives."""

    shape: tuple[int, ...]
    split: int | None
    scope: Scope
    layer: int = -1
    tp_partial: bool = False


def _applies(row: Row, shape: ModelShape, head: Head) -> bool:
    if row.scope is Scope.LM_HEAD and head is not Head.LM:
        return False
    if row.scope is Scope.VALUE_HEAD and head is not Head.VALUE:
        return False
    return shape.has(row.when)


@lru_cache(maxsize=256)
def param_table(shape: ModelShape, head: Head = Head.LM) -> dict[str, Param]:
    """Every parameter of the full (unsharded) model, HF name -> Param, in HF order."""
    rows = [r for r in TABLE if _applies(r, shape, head)]
    dims = lambda r: tuple(shape.size(d) for d in r.dims)  # noqa: E731
    out = {r.name: Param(dims(r), r.split, r.scope) for r in rows if r.scope is Scope.EMBED}
    layer_rows = [r for r in rows if r.scope is Scope.LAYER]
    for n in range(shape.n_layers):
        out.update({f"model.layers.{n}.{r.name}": Param(dims(r), r.split, r.scope, n, r.tp_partial)
                    for r in layer_rows})
    out.update({r.name: Param(dims(r), r.split, r.scope) for r in rows
                if r.scope not in (Scope.EMBED, Scope.LAYER)})
    return out


def param_shapes(shape: ModelShape, head: Head = Head.LM) -> dict[str, tuple[int, ...]]:
    """HF name -> full shape, in HF order."""
    return {n: p.shape for n, p in param_table(shape, head).items()}


@dataclass(frozen=True)
class Inventory:
    """Parameter counts by class, the cost model's and reallocation's unit: per decoder
    layer (tp-split and replicated), and the embedding, final norm and head."""

    layer_split: int
    layer_replicated: int
    embed: int  # tp-split (vocab-parallel)
    final: int  # replicated
    head: int  # the LM head (tp-split) or the value head (replicated)
    head_split: bool


@lru_cache(maxsize=256)
def inventory(shape: ModelShape, head: Head = Head.LM) -> Inventory:
    rows = [r for r in TABLE if _applies(r, shape, head)]
    count = lambda r: math.prod(shape.size(d) for d in r.dims)  # noqa: E731
    layer = [r for r in rows if r.scope is Scope.LAYER]
    heads = [r for r in rows if r.scope in (Scope.LM_HEAD, Scope.VALUE_HEAD)]
    return Inventory(
        layer_split=sum(count(r) for r in layer if r.split is not None),
        layer_replicated=sum(count(r) for r in layer if r.split is None),
        embed=sum(count(r) for r in rows if r.scope is Scope.EMBED),
        final=sum(count(r) for r in rows if r.scope is Scope.FINAL),
        head=sum(count(r) for r in heads),
        head_split=head is Head.LM,
    )


# The LM head's log-probs run in tiles of tokens whose fp32 logits (this rank's
# vocabulary slice) take about this many bytes (`rlhfc_runtime.logits`); the cost model
# prices one tile's working set from the same figure.
LOGIT_TILE_BYTES = 32 * 2**20


def logit_tile_tokens(local_vocab: int) -> int:
    """Tokens per tile of the LM head over a `local_vocab`-wide vocabulary slice."""
    return max(1, LOGIT_TILE_BYTES // (4 * max(local_vocab, 1)))
