"""The tiled, vocab-parallel LM head (`rlhfc_runtime.logits`) against full-vocabulary
logits: log-probs, entropies and the gradients of both with respect to the hidden
states and the head's weight, with and without final-logit soft-capping, for tp = 1, 2
and 4 (one spawned 4-process gloo world), with tiles smaller than, equal to and larger
than the token count; and the response-only head of the calls against the full one."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import ensure_groups, spawn
from rlhfc_runtime.logits import token_stats
from rlhfc_runtime.model import next_token_stats

N, H, V = 13, 8, 24  # V divisible by every tp
TILES = (1, 4, 13, 64)
CAPS = (0.0, 3.0)


def _inputs():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).float() * 2
    weight = torch.randn(V, H, generator=g) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return hidden, weight, tokens, g_lp, g_ent


def _reference(cap):
    """Values and gradients through full fp32 logits and log_softmax."""
    hidden, weight, tokens, g_lp, g_ent = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = h @ w.t()
    if cap:
        z = torch.tanh(z / cap) * cap
    logp_all = z.log_softmax(-1)
    logp = logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ((logp * g_lp).sum() + (entropy * g_ent).sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def _tiled(tp, rank, group, cap, tile):
    hidden, weight, tokens, g_lp, g_ent = _inputs()
    width = V // tp
    h = hidden.clone().requires_grad_()
    w = weight[rank * width:(rank + 1) * width].clone().requires_grad_()
    logp, entropy = token_stats(h, w, tokens, cap, group, rank * width, tile)
    ((logp * g_lp).sum() + (entropy * g_ent).sum()).backward()
    grad_h = h.grad.clone()
    if group is not None:  # what copy_to_tp's backward does: the ranks' partial sums
        import torch.distributed as dist
        dist.all_reduce(grad_h, group=group)
    return logp.detach(), entropy.detach(), grad_h, w.grad, slice(rank * width, (rank + 1) * width)


def _check(tp, rank, group, where):
    for cap in CAPS:
        ref_lp, ref_ent, ref_gh, ref_gw = _reference(cap)
        for tile in TILES:
            lp, ent, gh, gw, rows = _tiled(tp, rank, group, cap, tile)
            at = f"{where} cap={cap} tile={tile}"
            assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5, msg=lambda m: f"{at}: logp {m}")
            assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5, msg=lambda m: f"{at}: entropy {m}")
            assert_close(gh, ref_gh, atol=1e-4, rtol=1e-4, msg=lambda m: f"{at}: grad hidden {m}")
            assert_close(gw, ref_gw[rows], atol=1e-4, rtol=1e-4, msg=lambda m: f"{at}: grad weight {m}")


def test_tiled_head_matches_full_logits_at_tp1():
    _check(1, 0, None, "tp=1")


def test_bf16_autocast_matches_full_logits_within_bf16():
    hidden, weight, tokens, _, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = token_stats(hidden, weight, tokens, 0.0, tile=4)
        z = F.linear(hidden, weight).float()
    assert_close(lp, z.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1), atol=1e-4, rtol=1e-4)
    assert_close(ent, torch.distributions.Categorical(logits=z).entropy(), atol=1e-4, rtol=1e-4)


def _ranks(lm_dir):
    import torch.distributed as dist

    rank = dist.get_rank()
    done = []
    for tp in (2, 4):
        groups = [dist.new_group(list(range(lo, lo + tp))) for lo in range(0, 4, tp)]
        _check(tp, rank % tp, groups[rank // tp], f"tp={tp} rank {rank}")
        done.append(tp)
    # the calls' response-only head: the same log-probs and entropies at the response,
    # 0 elsewhere, and the same gradients as the full head under the same masked loss
    ensure_groups([Layout((0, 1), 1, 2, 1)])
    if rank < 2:
        ids = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(5))
        response = torch.zeros_like(ids)
        response[:, 5:] = 1
        response[1, 7:] = 0
        out = {}
        for name, targets in (("full", None), ("response", response)):
            model = ck.load_checkpoint(lm_dir, Layout((0, 1), 1, 2, 1))

            def loss(h, mb, targets=targets, name=name):
                lp, ent = next_token_stats(h, mb["input_ids"], targets, entropy=True)
                out[name] = (lp.detach(), ent.detach())
                return ((lp + 0.1 * ent) * response).sum()

            model.train_step(ids, None, loss, torch.optim.SGD(model.parameters(), lr=0.0), n_micro=1)
            out[name + "_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for k in (0, 1):
            assert_close(out["response"][k], out["full"][k] * response)
        for n, g in out["full_grads"].items():
            assert_close(out["response_grads"][n], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
        done.append("response")
    return done


def test_tiled_head_matches_full_logits_for_every_tp(tmp_path):
    lm_dir = ck.write_random_checkpoint(tmp_path / "lm", ck.tiny_config(num_hidden_layers=2), seed=3)
    done = spawn(_ranks, 4, lm_dir)
    assert done == [[2, 4, "response"]] * 2 + [[2, 4]] * 2
