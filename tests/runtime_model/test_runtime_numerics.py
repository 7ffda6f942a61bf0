"""Sharded LLaMA numerics against Hugging Face `transformers` on the same checkpoint:
logits, log-probs, loss, value head, gradients and one Adam step, for every
(dp, tp, pp) with dp*tp*pp <= 4, and for tied embeddings and Qwen2 (q/k/v biases) on
a few layouts — all in ONE spawned 4-process gloo world."""

import torch

from hf_reference import check_layout, hf_reference
from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.dist import ensure_groups, spawn
from rlhfc_runtime.contract.layout import Layout

# 4 layers so pp=4 still gives every stage a layer; kv heads 2 = the largest tp.
CONFIG = ck.tiny_config(num_hidden_layers=4, rope_theta=500.0)
LAYOUTS = [
    (dp, tp, pp)
    for dp in (1, 2, 3, 4) for tp in (1, 2) for pp in (1, 2, 3, 4)
    if dp * tp * pp <= 4
]
TIED_LAYOUTS = [(1, 1, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)]
QWEN2 = dict(CONFIG, model_type="qwen2", tie_word_embeddings=True)
QWEN2_LAYOUTS = [(1, 1, 1), (1, 2, 2), (2, 2, 1)]
BATCH, SEQ = 12, 9  # 12 rows split evenly over dp = 1..4
# eps well above fp32 grad noise: Adam divides by |g| + eps, so near-zero gradients would
# turn last-bit differences into visible weight differences
ADAM = dict(lr=1e-3, eps=1e-6)


def _batch():
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[3, -3:] = 0  # one right-padded row
    return ids, mask


def _hf_reference(lm_dir, value_dir=None):
    return hf_reference(lm_dir, value_dir, *_batch(), ADAM)


def _layout(dp, tp, pp):
    return Layout(tuple(range(dp * tp * pp)), dp, tp, pp)


def _check_cases(cases):
    """Run every (case, layout) this rank belongs to; returns what it checked."""
    import torch.distributed as dist

    ensure_groups(_layout(*key) for key in LAYOUTS)
    rank = dist.get_rank()
    checked = []
    for case, (lm_dir, value_dir, ref, keys) in cases.items():
        for key in keys:
            if rank < key[0] * key[1] * key[2]:
                check_layout(_layout(*key), lm_dir, value_dir, ref, f"{case} {key} rank {rank}", BATCH, ADAM, n_micro=2)
                checked.append((case, key))
    return checked


def test_sharded_llama_matches_transformers_for_every_layout(tmp_path):
    lm_dir = ck.write_random_checkpoint(tmp_path / "lm", CONFIG, seed=3)
    value_dir = ck.write_random_checkpoint(tmp_path / "value", CONFIG, seed=4, head="value")
    tied_dir = ck.write_random_checkpoint(tmp_path / "tied", dict(CONFIG, tie_word_embeddings=True), seed=5)
    qwen_dir = ck.write_random_checkpoint(tmp_path / "qwen2", QWEN2, seed=6)
    qwen_value_dir = ck.write_random_checkpoint(tmp_path / "qwen2_value", QWEN2, seed=7, head="value")
    cases = {
        "untied": (lm_dir, value_dir, _hf_reference(lm_dir, value_dir), LAYOUTS),
        "tied": (tied_dir, None, _hf_reference(tied_dir), TIED_LAYOUTS),
        "qwen2": (qwen_dir, qwen_value_dir, _hf_reference(qwen_dir, qwen_value_dir), QWEN2_LAYOUTS),
    }
    checked = spawn(_check_cases, 4, cases)
    # rank 0 is in every layout; every layout ran on all of its ranks
    for rank, done in enumerate(checked):
        want = [(c, k) for c, (_, _, _, keys) in cases.items() for k in keys if rank < k[0] * k[1] * k[2]]
        assert sorted(done) == sorted(want)
    assert len(checked[0]) == len(LAYOUTS) + len(TIED_LAYOUTS) + len(QWEN2_LAYOUTS)
    assert {(1, 2, 2), (2, 2, 1), (1, 1, 4), (3, 1, 1)} <= set(LAYOUTS)
