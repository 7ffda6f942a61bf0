"""The issue-23 measurement as a user meets it: SFT of a ~144M-parameter Llama (hidden
576, 22 layers, 8 heads / 4 kv heads, intermediate 1728, vocab 49152, untied as inline
shapes are) on 4 processes pinned to tp = 4, 2 steps with a
checkpoint and HF export after each. Each process's peak resident memory (VmHWM,
sampled by `data_bench.measure`); the 4 largest are the workers, and the writer's excess
is the largest minus the smallest of them. With `--base-dir DIR` (an older
rlhfc_runtime put first on PYTHONPATH) the rounds alternate with that code.

    flock /tmp/rlhfc-bench.lock python bench/state_run_bench.py --rounds 2 --base-dir DIR
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_bench import measure  # noqa: E402
from state_bench import alternate, state_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab=49152, hidden=576, intermediate=1728, n_layers=22, n_heads=8, n_kv_heads=4, max_positions=128,
             tied_embeddings=False)
PROGRAM = f"""import sft from "stdlib/sft.rlhf"
cluster {{ nodes = 1  devices_per_node = 4  device = "cpu" }}
model actor = llama(layers = 22, hidden = 576, heads = 8, kv_heads = 4, intermediate = 1728, vocab = 49152,
                    max_positions = 128) {{ trainable  optimizer = adam(lr = 1e-4) }}
dataset demos = jsonl("{ROOT}/data/tiny/sft.jsonl", prompt = "prompt", response = "response",
                      max_len = 32, tokenizer = "{ROOT}/data/tiny/tokenizer.json")
run sft(actor, demos) {{ batch = 4  steps = 2  seed = 1 }}
place a_tr on node0[0:4] dp = 1 tp = 4 pp = 1
"""


def one_round(pythonpath: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "sft143m.rlhf"
        source.write_text(PROGRAM)
        rlhfc = str(Path(sys.executable).parent / "rlhfc")
        if pythonpath:
            os.environ["PYTHONPATH"] = pythonpath
        try:
            got = measure([rlhfc, "run", str(source), "--devices", "4", "--save-every", "1", "--out", str(Path(tmp) / "out")])
        finally:
            os.environ.pop("PYTHONPATH", None)
    workers = sorted((peak for peak, _ in got["peaks"]), reverse=True)[:4]
    return {"worker_peaks": workers, "writer_excess": workers[0] - workers[-1], "seconds": got["seconds"]}


def main() -> None:
    runs = alternate(one_round, 2)
    state = state_bytes(SHAPE)
    out = {"params": state // 12, "state_bytes": state}
    for name, rs in runs.items():
        if rs:
            excess = statistics.median(r["writer_excess"] for r in rs)
            out[name] = {"writer_excess_bytes": excess, "writer_excess_fraction": excess / state, "rounds": rs}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
