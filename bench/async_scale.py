"""Asynchronous GRPO at GPU scale, on paper (run by hand):
`flock /tmp/rlhfc-bench.lock python bench/async_scale.py [ROW…]` writes
bench/results/async_scale.{json,md}.

Each row is a GRPO program (actor, frozen reference, rule reward) on H100-80GB nodes of 8,
planned once with `max_staleness = 1`: the plan carries the synchronous plan's seconds
per step (`sync_time`, the K = 0 plan) and the steady state's (`iteration_time`). Long
generation is priced as the cost model prices it (`response_len` is the mean response;
decoding runs `max_new_tokens` steps, so a tail up to 4x the mean sets the generate
call's length). The published asynchronous speedups (`/work/shared/REFERENCE.md`, the
peers' docs) sit beside the predicted ones in the README, with their settings.
ROW numbers rerun some rows only.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhfc.frontend.check import load_program  # noqa: E402
from rlhfc.planner.solve import plan_dataflow  # noqa: E402

TIME_LIMIT = float(__import__("os").environ.get("ASYNC_TIME_LIMIT", 60))


@dataclass(frozen=True)
class Row:
    """One planned setting: model preset, GPUs, prompts x samples, lengths, optimizer steps."""

    preset: str
    gpus: int
    prompts: int
    group: int
    prompt_len: int
    max_new: int
    mean_response: int
    mini_batches: int
    anchor: str  # the published setting it is closest to
    source: str = ""  # a repository program instead (planned with max_staleness = 1)

    def program(self) -> str:
        if self.source:
            text = (ROOT / self.source).read_text().replace('"../', f'"{ROOT}/').replace('"stdlib/', f'"{ROOT}/stdlib/')
            return text.replace("kl_coef = 0.05", "kl_coef = 0.05  max_staleness = 1")
        nodes = self.gpus // 8
        return f"""import grpo from "{ROOT}/stdlib/grpo.rlhf"
cluster {{ nodes = {nodes}  devices_per_node = 8  device = "H100-80GB" }}
model actor  = hf(preset = "{self.preset}") {{ trainable  optimizer = adam(lr = 1e-6) }}
model ref    = hf(preset = "{self.preset}")
model reward = rule("pattern_reward")
dataset prompts = jsonl("{ROOT}/data/tiny/prompts.jsonl", field = "prompt", max_len = {self.prompt_len},
                        tokenizer = "{ROOT}/data/tiny/tokenizer.json")
run grpo(actor, ref, reward, prompts) {{
    batch = {self.prompts}  group_size = {self.group}  max_new_tokens = {self.max_new}
    response_len = {self.mean_response}  mini_batches = {self.mini_batches}  kl_coef = 0.001  max_staleness = 1
}}
"""


ROWS = [
    # NeMo-RL's one-step-off setting: Llama-3.1-8B, 16 H100, 64 prompts x 32, max seq 4096, mean ~1,019 generated
    Row("llama-3.1-8b", 16, 64, 32, 512, 3584, 1019, 4, "NeMo-RL"),
    # verl's DAPO setting (512 prompts x 16, 32 prompts per optimizer step), generation cut to 16k / 8k
    Row("qwen2.5-7b", 16, 512, 16, 512, 16384, 4096, 16, "verl"),
    Row("qwen2.5-7b", 32, 512, 16, 512, 16384, 4096, 16, "verl"),
    Row("qwen2.5-7b", 64, 512, 16, 512, 16384, 4096, 16, "verl"),
    Row("qwen2.5-7b", 128, 512, 16, 512, 16384, 4096, 16, "verl"),
    Row("qwen2.5-7b", 128, 512, 16, 512, 8192, 2048, 16, "verl"),
    Row("qwen2.5-32b", 32, 512, 16, 512, 16384, 4096, 16, "verl"),
    Row("qwen2.5-32b", 64, 512, 16, 512, 16384, 4096, 16, "verl"),
    Row("qwen2.5-32b", 128, 512, 16, 512, 16384, 4096, 16, "verl"),
    Row("qwen2.5-32b", 128, 512, 16, 512, 8192, 2048, 16, "verl"),
    # short generation, where the model does predict a gain: the repository's PPO examples
    Row("llama-2-7b", 8, 512, 1, 256, 256, 256, 1, "ReaL", "programs/ppo_7b.rlhf"),
    Row("llama-2-70b", 128, 512, 1, 256, 256, 256, 1, "ReaL", "programs/ppo_70b.rlhf"),
]


def run_row(row: Row, scratch: Path) -> dict:
    path = scratch / f"{row.preset}_{row.gpus}_{row.max_new}.rlhf"
    assert "max_staleness = 1" in row.program()
    path.write_text(row.program())
    df = load_program(str(path), need_run=True)
    t0 = time.perf_counter()
    plan = plan_dataflow(df, time_limit=TIME_LIMIT)
    wall = time.perf_counter() - t0
    tokens = row.prompts * row.group * (row.prompt_len + row.mean_response)
    meshes = {p.call: f"{p.strategy.mesh.size}:{p.strategy.dp}/{p.strategy.tp}/{p.strategy.pp}"
              for p in plan.calls if p.call in ("gen", "a_tr")}
    return {
        "setting": (f"{row.source} ({row.preset} PPO, {row.gpus} GPUs)" if row.source else
                    f"{row.preset} {row.gpus} GPUs {row.prompts}x{row.group} gen {row.max_new} (mean {row.mean_response})"),
        "anchor": row.anchor, "sync_s": round(plan.sync_time, 1), "async_s": round(plan.iteration_time, 1),
        "speedup": round(plan.sync_time / plan.iteration_time, 2),
        "sync_tok_s_gpu": round(tokens / plan.sync_time / row.gpus),
        "async_tok_s_gpu": round(tokens / plan.iteration_time / row.gpus),
        "gen": meshes["gen"], "train": meshes["a_tr"],
        "disjoint": not set(plan.placement("gen").strategy.mesh.ranks(8)) & set(plan.placement("a_tr").strategy.mesh.ranks(8)),
        "status": plan.status, "gap": round(plan.gap, 3), "solve_s": round(wall, 1),
    }


COLUMNS = ["setting", "sync_s", "async_s", "speedup", "sync_tok_s_gpu", "async_tok_s_gpu", "gen", "train",
           "disjoint", "status", "gap", "solve_s"]


def main() -> None:
    only = {int(a) for a in sys.argv[1:]}
    out = ROOT / "bench" / "results"
    previous = json.loads((out / "async_scale.json").read_text()) if only and (out / "async_scale.json").exists() else []
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, row in enumerate(ROWS):
            if only and i not in only:
                kept = [r for r in previous if r.get("row") == i]
                results += kept
                continue
            results.append({"row": i, **run_row(row, Path(scratch))})
            print(json.dumps(results[-1]), flush=True)
    out.mkdir(exist_ok=True)
    (out / "async_scale.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in results]
    (out / "async_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
