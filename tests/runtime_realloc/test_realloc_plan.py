"""Reallocation and batch plans without processes: simulated on numpy arrays for every
pair of layouts, bytes checked against a brute-force element count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from realloc_cases import N_LAYERS, all_layouts, llama_shapes, slices_of

from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.offload import offload, reload
from rlhfc_runtime.realloc import bytes_moved, messages, minimum_bytes, plan_reallocation, reallocate
from rlhfc_runtime.transfer import plan_batch, rows_of

SHAPES = llama_shapes()
LAYOUTS = all_layouts()
PAIRS = [(a, b) for a in LAYOUTS for b in LAYOUTS]


def brute_force_minimum(src: Layout, dst: Layout, itemsize: int) -> int:
    """Element masks per rank: needed under dst and not held under src."""
    total = 0
    for name, p in SHAPES.items():
        shape = p.shape
        for r in dst.ranks:
            need = np.zeros(shape, bool)
            held = np.zeros(shape, bool)
            sl = slices_of(SHAPES, name, dst, r)
            if sl is not None:
                need[sl] = True
            sl = slices_of(SHAPES, name, src, r)
            if sl is not None:
                held[sl] = True
            total += int((need & ~held).sum())
    return total * itemsize


def test_layout_enumeration_covers_all_factorisations():
    assert len(LAYOUTS) == 16  # 4 single ranks, 2 pairs x 3, the 4-mesh x 6


def test_every_pair_simulated_bitwise_with_minimum_bytes():
    rng = np.random.default_rng(0)
    full = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in SHAPES.items()}
    for src, dst in PAIRS:
        plan = plan_reallocation(SHAPES, N_LAYERS, src, dst, itemsize=4, devices_per_node=2)
        old = {
            r: {n: full[n][sl] for n in SHAPES if (sl := slices_of(SHAPES, n, src, r)) is not None}
            for r in src.ranks
        }
        new = {r: {n: np.full(s, np.nan, np.float32) for n, s in plan.shapes_for(r).items()} for r in dst.ranks}
        written = {r: {n: np.zeros(s, int) for n, s in plan.shapes_for(r).items()} for r in dst.ranks}
        for t in plan.transfers:
            new[t.dst][t.name][t.dst_slices()] = old[t.src][t.name][t.src_slices()]
            written[t.dst][t.name][t.dst_slices()] += 1
        for r in dst.ranks:
            expected = {n for n in SHAPES if slices_of(SHAPES, n, dst, r) is not None}
            assert set(new[r]) == expected, (src, dst, r)
            for n in expected:
                want = full[n][slices_of(SHAPES, n, dst, r)]
                assert np.array_equal(new[r][n], want), (src, dst, r, n)
                assert (written[r][n] == 1).all(), (src, dst, r, n)  # each element exactly once
        assert bytes_moved(plan) == minimum_bytes(SHAPES, N_LAYERS, src, dst, 4) == brute_force_minimum(src, dst, 4)


def test_same_layout_moves_nothing():
    for layout in LAYOUTS:
        plan = plan_reallocation(SHAPES, N_LAYERS, layout, layout)
        assert bytes_moved(plan) == 0 and all(t.is_local for t in plan.transfers)


def test_sources_prefer_same_node():
    # dp2 x tp2 -> tp4 on nodes {0,1}, {2,3}: every missing quarter has a holder on the node.
    src, dst = Layout((0, 1, 2, 3), 2, 2, 1), Layout((0, 1, 2, 3), 1, 4, 1)
    plan = plan_reallocation(SHAPES, N_LAYERS, src, dst, devices_per_node=2)
    remote = [t for t in plan.transfers if not t.is_local]
    assert remote and all(t.src // 2 == t.dst // 2 for t in remote)


def test_senders_balanced_over_dp_replicas():
    src, dst = Layout((0, 1, 2, 3), 4, 1, 1), Layout((4, 5, 6, 7), 1, 4, 1)
    plan = plan_reallocation(SHAPES, N_LAYERS, src, dst, devices_per_node=8)
    sent = {r: sum(t.bytes for t in plan.transfers if t.src == r) for r in src.ranks}
    largest = max(t.bytes for t in plan.transfers)
    assert min(sent.values()) > 0 and max(sent.values()) - min(sent.values()) <= largest


def test_messages_respect_cap_order_and_single_rule():
    plan = plan_reallocation(SHAPES, N_LAYERS, Layout((0, 1), 1, 2, 1), Layout((2, 3), 1, 1, 2), itemsize=4)
    msgs = messages(plan.transfers, bucket_bytes=3000, single_min_bytes=4096)
    assert [(m.src, m.dst) for m in msgs] == sorted((m.src, m.dst) for m in msgs)
    assert any(m.single for m in msgs) and any(not m.single and len(m.transfers) > 1 for m in msgs)
    assert any(m.send_in_place and not m.recv_in_place for m in msgs)  # row-parallel weights into a full tensor
    for m in msgs:
        if m.single:
            t = m.transfers[0]
            assert len(m.transfers) == 1 and (t.src_contiguous or t.dst_contiguous) and t.bytes >= 4096
        else:
            assert len(m.transfers) == 1 or sum(t.bytes for t in m.transfers) <= 3000
    assert sum(t.bytes for m in msgs for t in m.transfers) == bytes_moved(plan)


def test_contiguity_flags_match_torch():
    flags = set()
    for src, dst in PAIRS:
        plan = plan_reallocation(SHAPES, N_LAYERS, src, dst, itemsize=4)
        for t in plan.transfers:
            sl = slices_of(SHAPES, t.name, src, t.src)
            src_view = torch.empty([s.stop - s.start for s in sl])[t.src_slices()]
            dst_view = torch.empty(plan.shapes_for(t.dst)[t.name])[t.dst_slices()]
            assert (t.src_contiguous, t.dst_contiguous) == (src_view.is_contiguous(), dst_view.is_contiguous()), t
            flags.add((t.src_contiguous, t.dst_contiguous))
    assert flags == {(True, True), (True, False), (False, True)}  # nested power-of-two intervals


def test_70b_plan_is_fast_and_minimal():
    import time

    shapes = llama_shapes(hidden=8192, inter=28672, vocab=128256, heads=64, kv_heads=8, n_layers=80)
    ranks = tuple(range(64))
    src, dst = Layout(ranks, 8, 8, 1), Layout(ranks, 2, 4, 8)
    t0 = time.perf_counter()
    plan = plan_reallocation(shapes, 80, src, dst)
    assert time.perf_counter() - t0 < 5
    assert bytes_moved(plan) == minimum_bytes(shapes, 80, src, dst) > 0


def test_batch_plan_every_pair_covers_rows_once():
    for batch_size in (8, 7):
        for src, dst in PAIRS:
            plan = plan_batch(batch_size, src, dst)
            for r in dst.ranks:
                lo, hi = rows_of(batch_size, dst, r)
                count = np.zeros(batch_size, int)
                for t in plan:
                    if t.dst == r:
                        assert rows_of(batch_size, src, t.src)[0] <= t.lo < t.hi <= rows_of(batch_size, src, t.src)[1]
                        count[t.lo : t.hi] += 1
                assert (count[lo:hi] == 1).all() and count.sum() == hi - lo
                held = rows_of(batch_size, src, r)
                moved = sum(t.hi - t.lo for t in plan if t.dst == r and t.src != r)
                overlap = 0 if held is None else max(0, min(hi, held[1]) - max(lo, held[0]))
                assert moved == (hi - lo) - overlap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_round_trip(dtype):
    shards = {"a": torch.randn(4, 8).to(dtype), "b": torch.randn(3).to(dtype)}
    host = offload(shards)
    assert all(h.device.type == "cpu" and h.data_ptr() != shards[n].data_ptr() for n, h in host.items())
    shards["a"].zero_()  # the host copy must not alias the device tensor
    back = reload(host, "cpu")
    assert back["a"].dtype == dtype and torch.equal(back["a"], host["a"]) and back["a"].abs().sum() > 0
    assert torch.equal(back["b"], shards["b"])


def test_rank_new_to_the_model_must_name_dtype():
    src, dst = Layout((0,), 1, 1, 1), Layout((1,), 1, 1, 1)
    with pytest.raises(ValueError, match="pass dtype="):
        reallocate({}, SHAPES, N_LAYERS, src, dst, rank=1)
    assert reallocate({}, SHAPES, N_LAYERS, src, dst, rank=2) == {}  # outside both: no-op


def test_compiler_cost_model_bytes_agree_with_minimum():
    """The solver's closed form (rlhfc.planner.cost.realloc) and this module's box arithmetic are
    independent computations of the same minimum: every pair of one-node layouts."""
    from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
    from rlhfc.planner.cost.realloc import realloc_cost
    from rlhfc.hardware import CATALOG
    from rlhfc.ir import Head, Mesh, Strategy
    from rlhfc_runtime.contract.shapes import param_table
    from rlhfc_runtime.model import ModelConfig

    device = next(iter(CATALOG.values()))
    cfg = ModelConfig.from_hf(dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2,
    ))
    shape = cfg.shape
    strategies = [
        Strategy(Mesh(0, 1, first, n), dp, tp, n // (dp * tp))
        for n in (1, 2, 4, 8) for first in range(0, 8, n) for dp in (1, 2, 4, 8) for tp in (1, 2, 4, 8)
        if n % (dp * tp) == 0
    ]
    per_param = 2  # bf16 on the wire
    for head in (Head.LM, Head.VALUE):
        shapes = param_table(cfg.shape, head)
        for a in strategies[::3]:
            for b in strategies:
                la, lb = (Layout(s.mesh.ranks(8), s.dp, s.tp, s.pp) for s in (a, b))
                cost = realloc_cost(shape, head, a, b, 8, device, DEFAULT_COEFFICIENTS, per_param)
                assert cost.bytes == minimum_bytes(shapes, 8, la, lb, per_param), (head, a, b)
