"""The checked dataflow: what every stage after `check` consumes.

Frozen dataclasses only. The checker builds these from the AST; the estimator, solver,
lowering and code generator read them and never see source text again. Field order and
names are a contract between stages: change them together with every consumer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class Span:
    """Where a construct came from, so any later stage can point at the source."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int


class CallKind(str, Enum):
    """The three things an RLHF dataflow does with a model."""

    GENERATE = "generate"
    INFERENCE = "inference"
    TRAIN = "train"


class Head(str, Enum):
    """What sits on top of the decoder: next-token logits or one scalar per token."""

    LM = "lm"
    VALUE = "value"


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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def param_count(self, head: Head = Head.LM) -> int:
        """Parameters of a LLaMA-family decoder: exact, so memory estimates are exact."""
        h, kv = self.hidden, self.n_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o; k, v
        mlp = 3 * h * self.intermediate  # gate, up, down
        per_layer = attn + mlp + 2 * h  # two RMSNorms
        embed = self.vocab * h
        out = h if head is Head.VALUE else (0 if self.tied_embeddings else self.vocab * h)
        return self.n_layers * per_layer + embed + h + out  # + final norm


@dataclass(frozen=True)
class Optimizer:
    """An optimizer and its hyper-parameters, e.g. adam(lr = 1e-6)."""

    name: str
    params: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Model:
    """A model of the program: its family, where its weights live, and how it is used.

    `kind` is "llama" for a neural decoder or "rule" for a registered Python reward
    function (no parameters; inference only; `rule` then names the function).
    """

    name: str
    kind: str
    shape: ModelShape | None
    head: Head
    trainable: bool
    checkpoint: str | None
    optimizer: Optimizer | None
    rule: str | None
    span: Span


@dataclass(frozen=True)
class Dataset:
    """A prompt (or pair) source: format, path relative to the program, and lengths."""

    name: str
    format: str
    path: str
    fields: tuple[tuple[str, str], ...]
    max_len: int
    span: Span
    tokenizer: str | None = None  # tokenizer.json path, resolved like `path`


@dataclass(frozen=True)
class Mesh:
    """An aligned block of devices: whole nodes, or a power-of-two slice of one node.

    Devices `first_device .. first_device + n_devices - 1` on each of the nodes
    `first_node .. first_node + n_nodes - 1`; a multi-node mesh always takes whole nodes.
    """

    first_node: int
    n_nodes: int
    first_device: int
    n_devices: int

    @property
    def size(self) -> int:
        return self.n_nodes * self.n_devices

    def ranks(self, devices_per_node: int) -> tuple[int, ...]:
        """Global ranks in mesh order (node-major), the order `Layout` indexes into."""
        return tuple(
            node * devices_per_node + self.first_device + d
            for node in range(self.first_node, self.first_node + self.n_nodes)
            for d in range(self.n_devices)
        )

    def __str__(self) -> str:
        if self.n_nodes > 1:
            return f"nodes[{self.first_node}:{self.first_node + self.n_nodes}]"
        return f"node{self.first_node}[{self.first_device}:{self.first_device + self.n_devices}]"


@dataclass(frozen=True)
class Strategy:
    """Where and how one call runs: a mesh and its data/tensor/pipeline degrees."""

    mesh: Mesh
    dp: int
    tp: int
    pp: int
    n_mbs: int = 1


@dataclass(frozen=True)
class Pin:
    """A placement the user fixed by hand; the solver treats it as a constraint."""

    call: str
    strategy: Strategy
    span: Span


@dataclass(frozen=True)
class Call:
    """One model function call of an iteration, with the sizes its cost depends on.

    `inputs` / `outputs` are data keys. `batch` is sequences per iteration (after group
    sampling), `prompt_len` and `gen_len` the token counts the estimator uses.
    """

    name: str
    model: str
    kind: CallKind
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    interface: str
    options: tuple[tuple[str, float | int | str], ...]
    batch: int
    prompt_len: int
    gen_len: int
    span: Span

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


class EdgeKind(str, Enum):
    """Why one call must wait for another."""

    DATA = "data"  # the consumer reads a key the producer writes
    PARAM = "param"  # a train call and another call of the same model


@dataclass(frozen=True)
class Edge:
    """`src` must finish before `dst` starts; `next_iteration` edges cross iterations."""

    src: str
    dst: str
    kind: EdgeKind
    key: str
    next_iteration: bool = False


@dataclass(frozen=True)
class Cluster:
    """The machines a plan is for: `device` names an entry of the hardware catalog."""

    nodes: int
    devices_per_node: int
    device: str
    overrides: tuple[tuple[str, float], ...] = ()

    @property
    def n_devices(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class RunConfig:
    """The `run` statement: which dataflow, and the hyper-parameters of the job."""

    dataflow: str
    batch: int
    steps: int
    params: tuple[tuple[str, float | int | str], ...] = ()
    span: Span | None = None

    def param(self, key: str, default=None):
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class Dataflow:
    """A whole checked program: the input of `estimate`, `solve` and `lower`."""

    source: str
    models: tuple[Model, ...]
    datasets: tuple[Dataset, ...]
    calls: tuple[Call, ...]
    edges: tuple[Edge, ...]
    cluster: Cluster
    run: RunConfig | None
    pins: tuple[Pin, ...] = field(default=())

    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)

    def call(self, name: str) -> Call:
        return next(c for c in self.calls if c.name == name)
