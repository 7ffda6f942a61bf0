"""ReaL's measured PPO settings as dataflows (Mei et al. 2024; figures and their source in
`bench/data/real_measured.json`): four same-size LLaMA models (actor, critic, reference,
reward) on H100s, 8 per node, prompt and generation lengths and prompts per iteration as
measured, and ReaL's 4 PPO mini-batches per train call. Used by `bench/plan_bench.py`
and `bench/fit_real.py`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "planner"))

from planner_fixtures import CODELLAMA_34B, LLAMA_7B, LLAMA_13B, LLAMA_70B, ppo_dataflow  # noqa: E402

from rlhfc.ir import Cluster, Dataflow  # noqa: E402

DATA = Path(__file__).parent / "data" / "real_measured.json"
SHAPES = {"7B": LLAMA_7B, "13B": LLAMA_13B, "34B": CODELLAMA_34B, "70B": LLAMA_70B}
MINI_BATCHES = 4  # ReaL's PPO default (REFERENCE.md)


@dataclass(frozen=True)
class Setting:
    """One measured row: sizes, and ReaL's and its symmetric heuristic's seconds per iteration."""

    actor: str
    critic: str
    gpus: int
    batch: int
    prompt: int
    gen: int
    real: float
    real_heuristic: float

    @property
    def name(self) -> str:
        return f"{self.actor}/{self.critic} {self.gpus} GPUs b{self.batch} g{self.gen}"

    def dataflow(self) -> Dataflow:
        df = ppo_dataflow(SHAPES[self.actor], Cluster(self.gpus // 8, 8, "H100-80GB"), batch=self.batch,
                          prompt_len=self.prompt, gen_len=self.gen, critic_shape=SHAPES[self.critic])
        return replace(df, run=replace(df.run, params=df.run.params + (("mini_batches", MINI_BATCHES),)))


def settings() -> list[Setting]:
    rows = json.loads(DATA.read_text())["rows"]
    keys = ("actor", "critic", "gpus", "batch", "prompt", "gen", "real", "real_heuristic")
    return [Setting(*(r[k] for k in keys)) for r in rows]
