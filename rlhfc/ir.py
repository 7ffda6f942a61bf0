"""The checked dataflow: what every stage after `check` consumes.

Frozen dataclasses only. The checker builds these from the AST; the estimator, solver,
lowering and code generator read them and never see source text again. Field order and
names are a contract between stages: change them together with every consumer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from rlhfc_runtime.contract.budget import micro_batches
from rlhfc_runtime.contract.kinds import CallKind, Head, ModelKind
from rlhfc_runtime.contract.shapes import ModelShape

__all__ = ["CallKind", "Head", "ModelKind", "ModelShape"]  # the contract's vocabulary, re-exported for the compiler


@dataclass(frozen=True)
class Span:
    """Where a construct came from, so any later stage can point at the source."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int


@dataclass(frozen=True)
class Optimizer:
    """An optimizer and its hyper-parameters, e.g. adam(lr = 1e-6)."""

    name: str
    params: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Model:
    """A model of the program: its family, where its weights live, and how it is used.

    `kind` is "llama" for a neural decoder or "rule" for a reward function without
    parameters (inference only): a registered rule (`rule` names it) or the user's
    Python functions (`functions`, weighted, plus weighted `score_keys` its calls take;
    `rule` is None).
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
    # python("rewards.py:f") rewards: (resolved file, function, weight) per component
    functions: tuple[tuple[str, str, float], ...] = ()
    # python(...) rewards: (data key, weight) per score the call takes after `seq` (a reward model's)
    score_keys: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Dataset:
    """A prompt (or pair) source: format, path relative to the program, and lengths."""

    name: str
    format: str
    path: str
    fields: tuple[tuple[str, str], ...]
    max_len: int
    span: Span
    tokenizer: str | None = None  # tokenizer.json or HF tokenizer directory, resolved like `path`
    chat: bool = False  # apply the tokenizer's chat template to the prompt (a user message)
    system: str | None = None  # the chat template's system message, if any
    columns: tuple[str, ...] = ()  # the row's other fields, passed to rewards and samples


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
    """Where and how one call runs: a mesh and its data/tensor/pipeline degrees;
    `token_budget`, the tokens of one micro-batch on one replica (the decision: the
    micro-batches follow from it, `Call.n_mbs`; 0 is the replica's whole (mini-)batch in
    one); `recompute` (train calls) keeps only each layer's input for backward and runs
    the forward again there (activation checkpointing)."""

    mesh: Mesh
    dp: int
    tp: int
    pp: int
    token_budget: int = 0
    recompute: bool = False


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
    sampling), `prompt_len` and `gen_len` the token counts the estimator uses, `settings`
    every value the runtime reads for this call, resolved by the checker.
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
    settings: tuple[tuple[str, int | float | str], ...] = ()  # resolved (`check.settings.resolve`)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    @property
    def mini_batches(self) -> int:
        """Mini-batches a train call cuts its rows into (an optimizer step each: its
        resolved setting, else its option); every other call makes one pass."""
        if self.kind is not CallKind.TRAIN:
            return 1
        return max(1, int(dict(self.settings).get("mini_batches", self.option("mini_batches", 1))))

    @property
    def row_len(self) -> int:
        """Priced tokens of one row: a sequence, or a chosen/rejected pair's two (the
        runtime keeps a pair in one micro-batch)."""
        return self.seq_len * max(1, self.batch // max(1, self.rows))

    def replica_rows(self, dp: int) -> int:
        """Rows of one (mini-)batch on one of `dp` replicas (the fullest)."""
        return math.ceil(self.rows / (dp * self.mini_batches))

    def budget_for(self, dp: int, n_mbs: int) -> int:
        """The token budget that cuts a replica's (mini-)batch into `n_mbs` micro-batches
        (as few as that at the priced lengths): what a pinned `n_mbs` means."""
        return math.ceil(self.replica_rows(dp) / n_mbs) * self.row_len

    def token_budget(self, s: "Strategy") -> int:
        """The tokens of one micro-batch under `s`: the plan's budget, at most the
        replica's whole (mini-)batch (all of it where the plan says 0). What memory is
        priced at and the op carries (`token_budget`): the runtime fills micro-batches
        with whole sequences up to it (`budget.fill`)."""
        whole = self.replica_rows(s.dp) * self.row_len
        return min(s.token_budget, whole) if s.token_budget else whole

    def n_mbs(self, s: "Strategy") -> int:
        """Micro-batches the budget makes of a replica's (mini-)batch at the priced
        lengths: what generation and a padded pass run, and what 1F1B keeps in flight
        at most (fewer where packing drops unused positions: `cost.model.seen_micro_batches`)."""
        return micro_batches(self.replica_rows(s.dp), self.row_len, self.token_budget(s))

    @property
    def rows(self) -> int:
        """Data rows of the call, what dp splits: `batch`, or half of it when each row
        holds a chosen/rejected pair (the resolved `rows` setting)."""
        return int(dict(self.settings).get("rows", self.batch))


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

    @property
    def seed(self) -> int:
        """Seeds sampling, shuffling and initialisation (0 unless the run sets it)."""
        return int(self.param("seed", 0))

    @property
    def keep(self) -> int:
        """Checkpoints kept (the newest `keep`; 2 unless the run sets it)."""
        return int(self.param("keep", 2))

    @property
    def max_staleness(self) -> int:
        """K: a rollout may come from a policy up to K updates behind the one it trains
        (0 unless the run sets it: synchronous RL)."""
        return int(self.param("max_staleness", 0))

    @property
    def save_every(self) -> int:
        """Steps between checkpoints (10 unless the run sets it)."""
        return int(self.param("save_every", 10))


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
