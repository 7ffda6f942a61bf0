"""What the hub tests share: a Hugging Face hub cache laid out as huggingface_hub lays it
out (blobs, snapshots/<commit> links, refs/main), a tiny random LLaMA repository for it,
so hub ids resolve offline and nothing is downloaded, and an SFT program naming one."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPO = "tiny-org/tiny-llama"
COMMIT = "1f0c5e8a" * 5  # a commit hash: 40 hex digits


def add_to_cache(hub_cache: Path, repo: str, files: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Put the files of directory `files` into `hub_cache` as revision `commit` of model
    repository `repo` (and point branch `ref` at it); returns the snapshot directory."""
    storage = hub_cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).unlink(missing_ok=True)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def tiny_llama(into: Path) -> Path:
    """A random 2-layer LLaMA saved by transformers, with the tiny task's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(into)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "data" / "tiny" / name, into / name)
    return into


SFT = ROOT / "data" / "tiny" / "sft.jsonl"


def sft_program(tmp_path: Path, model: str, dataset_keys: str = "", name: str = "prog.rlhf") -> Path:
    """A 2-step SFT program on the tiny demonstrations whose actor is `model`."""
    path = tmp_path / name
    path.write_text(f"""import sft from "stdlib/sft.rlhf"
model actor = {model} {{ trainable  optimizer = adam(lr = 1e-3) }}
dataset demos = jsonl("{SFT}", prompt = "prompt", response = "response", max_len = 16{dataset_keys})
run sft(actor, demos) {{ batch = 4  steps = 2  seed = 1 }}
""")
    return path


def rlhfc(*args: str) -> subprocess.CompletedProcess:
    """The `rlhfc` command in a process of its own, with this process's environment."""
    return subprocess.run([str(Path(sys.executable).with_name("rlhfc")), *args], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "NO_COLOR": "1"})
