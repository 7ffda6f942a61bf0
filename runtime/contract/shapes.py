"""Model shapes: the sizes the cost model and the runtime need, and the exact parameter
counts of every tensor and every shard (derived from the layout convention), so the
memory the planner prices is the memory the runtime allocates."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfc_runtime.contract.kinds import Head


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model and the runtime need, as in a Hugging Face config.json."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 4096
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q, k and v projections have biases

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def param_count(self, head: Head = Head.LM) -> int:
        """Parameters of a LLaMA-family decoder: exact, so memory estimates are exact."""
        h, kv = self.hidden, self.n_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o; k, v
        if self.qkv_bias:
            attn += h + 2 * kv
        mlp = 3 * h * self.intermediate  # gate, up, down
        per_layer = attn + mlp + 2 * h  # two RMSNorms
        embed = self.vocab * h
        out = h if head is Head.VALUE else (0 if self.tied_embeddings else self.vocab * h)
        return self.n_layers * per_layer + embed + h + out  # + final norm
