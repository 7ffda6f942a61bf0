"""1F1B, activation recompute, bucketed gradient all-reduce and bf16 mixed precision
against today's numerics (GPipe, fp32, one flat bucket), in one spawned 2-process
gloo world: pp = 2 (the schedules exchange activations and gradients) and dp = 2."""

import torch
import torch.distributed as dist
from torch.testing import assert_close

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import ensure_groups, spawn
from rlhfc_runtime.model import lm_loss

CFG = ck.tiny_config(num_hidden_layers=4)
PP2, DP2 = Layout((0, 1), 1, 1, 2), Layout((0, 1), 2, 1, 1)


def _batch(rows=8):
    ids = torch.randint(0, CFG["vocab_size"], (rows, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    return ids, mask


def _grads(layout, **kw):
    model = ck.init_random(CFG, layout, "lm", 0, "cpu")
    ids, mask = _batch()
    if layout.dp > 1:  # this replica's rows
        half = ids.shape[0] // 2
        ids, mask = ids[dist.get_rank() * half:][:half], mask[dist.get_rank() * half:][:half]
    bucket = kw.pop("bucket_bytes", None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.zero_grad()
    loss = model.run_pipeline(ids, mask, lm_loss, kw.pop("n_micro", 4), backward=True, **kw)
    model.reduce_gradients(**({"bucket_bytes": bucket} if bucket else {}))
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def _bf16_step(layout):
    """One Adam step under bf16 autocast on fp32 master weights vs the fp32 step."""
    out = {}
    for precision in ("fp32", "bf16"):
        model = ck.init_random(CFG, layout, "lm", 0, "cpu")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ids, mask = _batch()
        loss = model.train_step(ids, mask, lm_loss, opt, n_micro=2, precision=precision)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        states = {s.dtype for st in opt.state.values() for s in st.values() if torch.is_tensor(s) and s.dim()}
        out[precision] = (loss, weights, grads, {p.dtype for p in model.parameters()} | states)
    return out


def _work():
    ensure_groups([PP2, DP2])
    checked = []
    refs = {n: _grads(PP2, schedule="gpipe", n_micro=n) for n in (1, 3, 4)}  # today's schedule
    for kw in (dict(schedule="1f1b"), dict(schedule="1f1b", recompute=True), dict(schedule="gpipe", recompute=True),
               dict(schedule="1f1b", n_micro=1), dict(schedule="1f1b", n_micro=3)):
        ref_loss, ref = refs[kw.get("n_micro", 4)]
        loss, grads = _grads(PP2, **kw)
        assert abs(loss - ref_loss) < 1e-5, (kw, loss, ref_loss)
        for n in ref:
            assert_close(grads[n], ref[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{kw} {n}: {m}")
        checked.append(str(kw))
    # bucketed dp all-reduce: tiny buckets (many) and one big bucket agree
    _, small = _grads(DP2, bucket_bytes=1024)
    _, big = _grads(DP2)
    for n in big:
        assert_close(small[n], big[n], rtol=0, atol=0)
    checked.append("buckets")
    steps = _bf16_step(PP2)
    (loss32, w32, g32, _), (loss16, w16, g16, dtypes16) = steps["fp32"], steps["bf16"]
    assert dtypes16 == {torch.float32}  # master weights, their gradients' reduction and Adam state stay fp32
    assert abs(loss16 - loss32) < 1e-2 * abs(loss32), (loss16, loss32)
    for n in g32:  # gradients agree to bf16 precision (relative to each tensor's norm)
        assert g16[n].dtype == torch.float32
        assert (g16[n] - g32[n]).norm() <= 3e-2 * g32[n].norm() + 1e-6, n
    for n in w32:  # Adam's first step is about lr * sign(g): a near-zero gradient may flip sign
        assert_close(w16[n], w32[n], rtol=0, atol=2.05e-2)
    assert any(not torch.equal(g16[n], g32[n]) for n in g32)  # bf16 really ran
    checked.append("bf16")
    return checked


def test_1f1b_recompute_buckets_and_bf16_match_the_reference():
    results = spawn(_work, 2)
    assert all(len(r) == 7 for r in results), results


def test_precision_widths_are_the_dtypes():
    """The contract's widths (what the cost model prices) are the runtime's dtypes' sizes."""
    from rlhfc_runtime.contract.interfaces import PRECISION_BYTES
    from rlhfc_runtime.model import DTYPES

    assert {p: DTYPES[p].itemsize for p in DTYPES} == PRECISION_BYTES
