"""The compiled program besides its ops: models, datasets, run settings, cluster facts and
the plan's estimates, as frozen dataclasses. The backend fills them, the generated file
spells them out as constructor calls (`PROGRAM = Program(...)`), the runtime reads their
fields: the schema lives here, once.

Pure Python, no torch: the compiler imports it too. `as_json` gives the plain-data form
that checkpoint manifests store and compare on resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rlhfc_runtime.contract.kinds import ModelKind
from rlhfc_runtime.contract.shapes import ModelShape


@dataclass(frozen=True)
class ModelSpec:
    """One model: a neural decoder (its whole contract shape, or a checkpoint whose
    config.json the runtime reads) or a reward without parameters (`rule` or user
    Python `functions` combined with `score_keys`)."""

    kind: str
    head: str = "lm"
    shape: ModelShape | None = None
    trainable: bool = False
    checkpoint: str | None = None  # a directory, or hf://owner/name[@rev] until the launcher resolves it
    optimizer: dict | None = None  # {"name": "adam", "lr": …}
    rule: str | None = None
    functions: tuple[tuple[str, str, float], ...] = ()  # (file, function, weight)
    score_keys: tuple[tuple[str, float], ...] = ()  # (data key, weight)
    home: str | None = None  # the layout its parameters live in between iterations
    offloaded: bool = False  # waits in host memory between its calls
    init_seed: int = 0

    @property
    def neural(self) -> bool:
        return self.kind != ModelKind.RULE


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where its rows are, which fields the dataflow reads, how to tokenize."""

    format: str
    path: str
    fields: dict  # role -> column
    tokenizer: str | None
    max_len: int
    chat: bool = False
    system: str | None = None
    columns: tuple[str, ...] = ()  # extra columns python rewards read


@dataclass(frozen=True)
class RunSpec:
    """The run block's job settings (a call's hyper-parameters travel in its op)."""

    dataflow: str
    batch: int
    steps: int
    seed: int = 0
    save_every: int = 10
    keep: int = 2
    max_staleness: int = 0


@dataclass(frozen=True)
class Program:
    """Everything the engine needs besides the ops, layouts and groups."""

    source: str | None
    world_size: int
    device: str
    devices_per_node: int
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    run: RunSpec
    reward_key: str | None = None  # the data key whose mean is the run's `reward` curve
    estimates: dict[str, float] = field(default_factory=dict)  # call -> planned seconds
    estimated_iteration: float = 0.0  # planned seconds per step (the steady state's, when asynchronous)
    estimated_peak_bytes: dict[str, int] = field(default_factory=dict)  # call -> planned peak

    def as_json(self) -> dict:
        """Plain data (dicts, lists, numbers, strings): what a checkpoint manifest keeps."""
        return asdict(self)

    def trainable(self) -> list[str]:
        """The models a checkpoint saves, sorted."""
        return sorted(n for n, m in self.models.items() if m.trainable and m.neural)
