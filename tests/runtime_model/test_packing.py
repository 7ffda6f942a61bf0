"""Packed batches: the layout itself (bins, positions, block-diagonal and windowed masks,
pack / unpack), and every interface's packed call equal to its padded call (outputs,
losses, metrics, gradients after one Adam step) under dp, tp and pp, the padded call in
two equal micro-batches and the packed one in micro-batches by token budget, through
`calls.run_call` as the engine runs it."""

import torch
from torch.testing import assert_close

from rlhfc_runtime import calls
from rlhfc_runtime.contract.budget import balanced, fill, micro_batches
from rlhfc_runtime.contract.interfaces import INTERFACES
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.contract.program import ModelSpec
from rlhfc_runtime.contract.shapes import ModelShape
from rlhfc_runtime.dist import ensure_groups, rank_groups, spawn
from rlhfc_runtime.packing import plan_packing
from rlhfc_runtime.transfer import rows_of

B, P, N = 4, 6, 7  # rows (pairs for pair interfaces), prompt and response widths
PROMPTS, RESPONSES = (6, 3, 5, 2), (7, 2, 4, 5)
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]
SHAPE = {"vocab": 48, "hidden": 32, "intermediate": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "max_positions": 64, "tied_embeddings": False}


def test_plan_packs_whole_sequences_with_their_own_positions():
    mask = torch.zeros(4, 10, dtype=torch.long)
    for row, (lo, hi) in enumerate([(2, 9), (4, 6), (3, 8), (5, 7)]):
        mask[row, lo:hi] = 1
    pk = plan_packing(mask)
    assert (pk.lo, pk.hi) == (2, 9) and pk.shape == (3, 7)  # 7 + 5 + 2 + 2 tokens in bins of 7
    assert pk.segment.tolist() == [[0] * 7, [2] * 5 + [1] * 2, [3] * 2 + [-1] * 5]  # longest first, first fit
    assert pk.positions[1].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert pk.lengths == (7, 5, 2, 2)
    ids = torch.arange(40).view(4, 10)
    window = ids[:, pk.lo:pk.hi]
    packed = pk.pack(window)
    back = pk.unpack(packed[..., None].float())[..., 0]
    valid = mask[:, pk.lo:pk.hi].bool()
    assert_close(back[valid], window[valid].float())
    assert (back[~valid] == 0).all()
    m = pk.mask()[1, 0]
    assert m[6, 5] and m[4, 0] and not m[0, 4]  # causal inside a sequence
    assert not m[5, 4] and not m[6, 4]  # never across the boundary
    assert pk.mask()[2, 0, 6].tolist() == [False] * 6 + [True]  # an empty slot sees itself only
    assert not pk.mask(window=2)[0, 0, 6, 4] and pk.mask(window=2)[0, 0, 6, 5]
    assert pk.cu_seqlens().tolist() == [0, 7, 12, 14, 16, 17, 18, 19, 20, 21]


def test_budget_fills_micro_batches_with_whole_sequences():
    assert fill([5, 7, 3, 9, 2], 12) == [0, 2, 4, 5]
    assert fill([15, 3], 12) == [0, 1, 2]  # a longer sequence runs alone
    assert micro_batches(16, 65, 4 * 65) == 4 and micro_batches(16, 40, 4 * 65) == 3  # 6 shorter ones fit
    lengths = [30, 2, 3, 25, 4, 1]  # dealt longest first to the lighter rank
    assert [balanced(lengths, 2, k) for k in (0, 1)] == [[0, 1, 5], [2, 3, 4]]  # 33 and 32 tokens


def _sequences(gen):
    """Left-padded prompts and right-padded responses of different lengths."""
    ids = torch.randint(3, SHAPE["vocab"], (B, P + N), generator=gen)
    mask = torch.zeros(B, P + N, dtype=torch.long)
    response = torch.zeros_like(mask)
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        mask[row, P - p:P + r] = 1
        response[row, P:P + r] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "response_mask": response}


def _inputs(name):
    gen = torch.Generator().manual_seed(3)
    seq = _sequences(gen)
    pairs = {k: torch.stack([seq[k], seq[k].roll(1, 0)], 1) for k in seq}
    per_token = lambda: torch.randn(B, P + N, generator=gen) * seq["response_mask"] - 2.0  # noqa: E731
    make = {"seq": lambda: seq, "data": lambda: seq, "pairs": lambda: pairs, "logp": per_token,
            "values": per_token, "score": lambda: torch.randn(B, generator=gen),
            "base_score": lambda: torch.randn(B, generator=gen),
            "ref_logp": (lambda: torch.randn(B, 2, generator=gen)) if name == "dpo" else per_token}
    return {key: (v if isinstance(v := make[key](), dict) else {key: v}) for key in INTERFACES[name].inputs}


def _settings(name):
    return {**INTERFACES[name].defaults(), "rows": B, "n_mbs": 2, "token_budget": 0, "recompute": False, "precision": "fp32",
            "group_size": 2, "step": 0, "steps": 1, "seed": 0, "eos_id": 2, "pad_id": 0, "max_new_tokens": N}


def _run(name, layout, pack):
    iface = INTERFACES[name]
    head = iface.head.value
    trainable = iface.kind.value == "train"
    spec = ModelSpec("llama", head=head, shape=ModelShape(**SHAPE), trainable=trainable,
                     optimizer={"name": "adam", "lr": 1e-3} if trainable else None)
    model = calls.build_model(spec, layout)
    groups = rank_groups(layout)
    lo, hi = rows_of(B, layout, groups.rank)
    batch = {k: {n: t[lo:hi] for n, t in v.items()} for k, v in _inputs(name).items()}
    out, metrics = calls.run_call(iface.kind.value, name, model, spec, batch, iface.outputs, {**_settings(name), "packing": "packed" if pack else "padded",
                                   "token_budget": 20 if pack else 0},
                                  groups)
    return out, metrics, {n: p.detach().clone() for n, p in model.module.named_parameters()}


def _compare_all():
    import torch.distributed as dist

    ensure_groups(Layout(tuple(range(dp * tp * pp)), dp, tp, pp) for dp, tp, pp in LAYOUTS)
    rank, checked = dist.get_rank(), []
    for dp, tp, pp in LAYOUTS:
        layout = Layout(tuple(range(dp * tp * pp)), dp, tp, pp)
        if rank >= dp * tp * pp:
            continue
        for name, iface in INTERFACES.items():
            if iface.kind.value == "generate":
                continue
            where = f"{name} dp={dp} tp={tp} pp={pp}"
            padded, packed = _run(name, layout, False), _run(name, layout, True)
            for key in padded[0]:  # a padded pass leaves garbage before a row's first token
                seen = _inputs(name)[iface.inputs[0]]["attention_mask"].cumsum(-1) > 0
                lo, hi = rows_of(B, Layout(tuple(range(dp * tp * pp)), dp, tp, pp), rank)
                seen = seen[lo:hi] if seen.dim() == 2 else seen[lo:hi, 0]
                a, b = packed[0][key][key], padded[0][key][key]
                a, b = (a[seen], b[seen]) if a.shape == seen.shape else (a, b)
                assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {key} {m}")
            assert set(packed[1]) == set(padded[1])
            for key, value in padded[1].items():
                assert abs(packed[1][key] - value) <= 1e-5 * max(1.0, abs(value)), f"{where}: {key}"
            for n, w in padded[2].items():  # Adam turns last-bit gradient noise near zero into ~lr/10
                assert_close(packed[2][n], w, atol=1e-4, rtol=0, msg=lambda m: f"{where}: {n} {m}")
            checked.append(where)
    return checked


def test_packed_calls_equal_padded_calls_for_every_interface_under_dp_tp_pp():
    checked = spawn(_compare_all, 2)
    names = [n for n, i in INTERFACES.items() if i.kind.value != "generate"]
    assert len(checked[0]) == len(LAYOUTS) * len(names)
    assert len(checked[1]) == (len(LAYOUTS) - 1) * len(names)
