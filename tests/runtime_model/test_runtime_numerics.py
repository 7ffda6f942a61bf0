"""Sharded LLaMA numerics against Hugging Face `transformers` on the same checkpoint:
logits, log-probs, loss, value head, gradients and one Adam step, for every
(dp, tp, pp) with dp*tp*pp <= 4 — all in ONE spawned 4-process gloo world."""

import torch
from torch.testing import assert_close

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.dist import ensure_groups, spawn
from rlhfc_runtime.layout import Layout
from rlhfc_runtime.model import lm_loss

# 4 layers so pp=4 still gives every stage a layer; kv heads 2 = the largest tp.
CONFIG = ck.tiny_config(num_hidden_layers=4, rope_theta=500.0)
LAYOUTS = [
    (dp, tp, pp)
    for dp in (1, 2, 3, 4) for tp in (1, 2) for pp in (1, 2, 3, 4)
    if dp * tp * pp <= 4
]
BATCH, SEQ, LR = 12, 9, 1e-3  # 12 rows split evenly over dp = 1..4


def _batch():
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[3, -3:] = 0  # one right-padded row
    return ids, mask


def _hf_reference(lm_dir, value_dir):
    """Logits, log-probs, values; loss, grads and post-Adam weights on the full batch."""
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    ids, mask = _batch()
    hf = LlamaForCausalLM.from_pretrained(lm_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
    logprobs = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    vm = LlamaForTokenClassification.from_pretrained(value_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        values = vm(ids, attention_mask=mask).logits[..., 0]
    # training reference: full (unpadded) batch, mean next-token CE, one Adam step
    opt = torch.optim.Adam(hf.parameters(), lr=LR)
    loss = hf(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in hf.named_parameters()}
    opt.step()
    weights = {n: p.detach().clone() for n, p in hf.named_parameters()}
    return dict(ids=ids, mask=mask, logits=logits, logprobs=logprobs, values=values,
                loss=loss.detach(), grads=grads, weights=weights)


def _check_layouts(lm_dir, value_dir, ref):
    import torch.distributed as dist

    layouts = [Layout(tuple(range(dp * tp * pp)), dp, tp, pp) for dp, tp, pp in LAYOUTS]
    ensure_groups(layouts)
    rank = dist.get_rank()
    checked = []
    for lay in layouts:
        if rank not in lay.ranks:
            continue
        _, dp_rank, _ = lay.coord(rank)
        rows = slice(dp_rank * BATCH // lay.dp, (dp_rank + 1) * BATCH // lay.dp)
        ids, mask = ref["ids"][rows], ref["mask"][rows]
        valid = mask.bool()
        where = f"layout dp={lay.dp} tp={lay.tp} pp={lay.pp} rank {rank}"
        n_micro = min(2, ids.shape[0])

        model = ck.load_checkpoint(lm_dir, lay)
        logits = model(ids, mask, n_micro=n_micro)
        assert_close(logits[valid], ref["logits"][rows][valid], atol=1e-4, rtol=0, msg=lambda m: f"{where}: logits {m}")
        lp = model.token_logprobs(ids, mask, n_micro=n_micro)
        assert_close(lp[valid[:, 1:]], ref["logprobs"][rows][valid[:, 1:]], atol=1e-4, rtol=0,
                     msg=lambda m: f"{where}: logprobs {m}")

        value = ck.load_checkpoint(value_dir, lay)
        values = value.values(ids, mask, n_micro=n_micro)
        assert_close(values[valid], ref["values"][rows][valid], atol=1e-4, rtol=0, msg=lambda m: f"{where}: values {m}")

        full = ref["ids"][rows]
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        loss = model.train_step(full, None, lm_loss, opt, n_micro=n_micro)
        # each replica's loss is its rows' mean; their average is the full-batch loss
        replica_loss = torch.tensor([loss])
        dist.all_reduce(replica_loss, group=model.groups.dp)
        assert abs(replica_loss.item() / lay.dp - ref["loss"].item()) < 1e-5, where
        for name, p in model.named_parameters():
            sl = model.slices(name)
            assert_close(p.grad, ref["grads"][name][sl], atol=1e-5, rtol=1e-4, msg=lambda m: f"{where}: grad {name} {m}")
            assert_close(p.detach(), ref["weights"][name][sl], atol=1e-5, rtol=0, msg=lambda m: f"{where}: {name} {m}")
        checked.append((lay.dp, lay.tp, lay.pp))
    return checked


def test_sharded_llama_matches_transformers_for_every_layout(tmp_path):
    lm_dir = ck.write_random_checkpoint(tmp_path / "lm", CONFIG, seed=3)
    value_dir = ck.write_random_checkpoint(tmp_path / "value", CONFIG, seed=4, head="value")
    ref = _hf_reference(lm_dir, value_dir)
    checked = spawn(_check_layouts, 4, lm_dir, value_dir, ref)
    # rank 0 is in every layout; every layout ran on all of its ranks
    assert sorted(checked[0]) == sorted(LAYOUTS)
    for rank, done in enumerate(checked):
        assert sorted(done) == sorted(l for l in LAYOUTS if rank < l[0] * l[1] * l[2])
    assert (1, 2, 2) in LAYOUTS and (2, 2, 1) in LAYOUTS and (1, 1, 4) in LAYOUTS
