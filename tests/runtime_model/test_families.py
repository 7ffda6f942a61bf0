"""Every model family against `transformers` on checkpoints `transformers` itself wrote
(`family_cases`): logits, log-probs, entropy, values, loss, gradients and one Adam step,
at fp32, under dp, tp and pp — all in ONE spawned 4-process gloo world. Phi-3's fused
`qkv_proj` / `gate_up_proj` are compared part by part (the rows each part is)."""

import pytest
import torch

from family_cases import FAMILIES, has_value_class, write_family
from hf_reference import check_layout, hf_reference
from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import ensure_groups, spawn

LAYOUTS = [(1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2)]
BATCH, SEQ = 4, 11  # longer than every test window
ADAM = dict(lr=1e-3, eps=1e-6)


def _batch(vocab):
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one right-padded row
    return ids, mask


def _reference(lm_dir, value_dir):
    vocab = ck.read_config(lm_dir)["vocab_size"]
    ref = hf_reference(lm_dir, value_dir, *_batch(vocab), ADAM)
    return {**ref, "loss": ref["loss"].item()}


def _layout(dp, tp, pp):
    return Layout(tuple(range(dp * tp * pp)), dp, tp, pp)


def _check_all(cases):
    import torch.distributed as dist

    ensure_groups(_layout(*key) for key in LAYOUTS)
    rank, checked = dist.get_rank(), []
    for name, (lm_dir, value_dir, ref) in cases.items():
        for key in LAYOUTS:
            if rank < key[0] * key[1] * key[2]:
                check_layout(_layout(*key), lm_dir, value_dir, ref, f"{name} {key} rank {rank}", BATCH, ADAM,
                             weight_atol=1e-4)
                checked.append((name, key))
    return checked


def test_every_family_matches_transformers_under_dp_tp_pp(tmp_path):
    cases = {}
    for i, name in enumerate(FAMILIES):
        lm_dir = write_family(name, tmp_path / name, seed=i)
        value_dir = write_family(name, tmp_path / f"{name}_value", seed=100 + i, value=True) \
            if has_value_class(name) else None
        cases[name] = (str(lm_dir), value_dir and str(value_dir), _reference(lm_dir, value_dir))
    checked = spawn(_check_all, 4, cases)
    for rank, done in enumerate(checked):
        assert sorted(done) == sorted((n, k) for n in cases for k in LAYOUTS if rank < k[0] * k[1] * k[2])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_is_the_checkpoints_own_class_and_tensors(tmp_path, name):
    """Loading a family checkpoint and saving it back gives a checkpoint `transformers`
    loads as the same class, with the same tensors (fused ones fused again)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = write_family(name, tmp_path / "src")
    out = spawn(_save_copy, 1, str(src), str(tmp_path / "out"))[0]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == ck.read_config(src)["architectures"][0]
    want, got = load_file(str(src / "model.safetensors")), load_file(f"{out}/model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _save_copy(src, dst):
    model = ck.load_checkpoint(src, Layout((0,), 1, 1, 1))
    return str(ck.save_checkpoint(model, dst))
