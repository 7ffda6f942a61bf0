"""Planner tests: cost formulas against exhaustive counts, CP-SAT against brute force,
pins, infeasibility diagnostics, plan JSON and the CLI."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from pathlib import Path

import pytest
from planner_fixtures import LLAMA_7B, TINY, ppo_dataflow, small_dataflow
from typer.testing import CliRunner

from rlhfc.frontend.check import load_program
from rlhfc.cli import app
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.cost.model import call_cost
from rlhfc.planner.cost.realloc import realloc_cost
from rlhfc.hardware import device_for
from rlhfc.ir import Cluster, Head, Mesh, Pin, Strategy
from rlhfc.plan import Plan
from rlhfc.planner.solve import PlanError, SearchSpace, build_problem, plan_dataflow
from rlhfc.planner.solve.baselines import brute_force, mcmc
from rlhfc.planner.solve.cpsat import solve_cpsat
from rlhfc_runtime.contract.layout import Layout, shard_slices
from rlhfc_runtime.contract.shapes import param_table

ROOT = Path(__file__).resolve().parents[2]
CPU4 = Cluster(1, 4, "cpu")


def _volume(sl):
    n = 1
    for s in sl:
        n *= max(0, s.stop - s.start)
    return n


def _exhaustive_missing(shape, head, src: Strategy, dst: Strategy, dpn: int) -> int:
    """Elements destinations need and do not hold, counted slice by slice."""
    la = Layout(src.mesh.ranks(dpn), src.dp, src.tp, src.pp)
    lb = Layout(dst.mesh.ranks(dpn), dst.dp, dst.tp, dst.pp)
    missing = 0
    for name, p in param_table(shape, head).items():  # slice by slice, against the closed form
        for r in lb.ranks:
            need = shard_slices(name, p.shape, shape.n_layers, lb, r, p.split)
            if need is None:
                continue
            have = shard_slices(name, p.shape, shape.n_layers, la, r, p.split)
            overlap = 0 if have is None else _volume(
                tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(need, have)))
            missing += _volume(need) - overlap
    return missing


def _layouts(mesh: Mesh):
    for tp, pp in itertools.product((1, 2, 4), (1, 2)):
        if mesh.size % (tp * pp) == 0 and tp <= mesh.n_devices:
            yield Strategy(mesh, mesh.size // (tp * pp), tp, pp)


@pytest.mark.parametrize("head", [Head.LM, Head.VALUE])
def test_realloc_bytes_equal_exhaustive_count(head):
    device = device_for(CPU4)
    meshes = [Mesh(0, 1, 0, 4), Mesh(0, 1, 0, 2), Mesh(0, 1, 2, 2)]
    strategies = [s for m in meshes for s in _layouts(m)]
    for src, dst in itertools.product(strategies, strategies):
        cost = realloc_cost(TINY, head, src, dst, 4, device, DEFAULT_COEFFICIENTS, 2)
        assert cost.bytes == 2 * _exhaustive_missing(TINY, head, src, dst, 4), (src, dst)
    same = realloc_cost(TINY, head, strategies[0], strategies[0], 4, device, DEFAULT_COEFFICIENTS, 2)
    assert same.bytes == 0 and same.seconds == 0



@pytest.mark.parametrize("head", [Head.LM, Head.VALUE])
def test_realloc_run_by_run_equals_device_by_device(head):
    """The fast closed forms (rank ranges counted run by run, at any offset; disjoint
    meshes) give the very bytes and seconds of the device-by-device count."""
    from rlhfc.planner.cost.realloc import _missing_by_rank

    device, c = device_for(Cluster(4, 8, "H100-80GB")), DEFAULT_COEFFICIENTS
    meshes = [Mesh(0, 4, 0, 8), Mesh(2, 2, 0, 8), Mesh(1, 1, 0, 8), Mesh(1, 1, 4, 4), Mesh(1, 1, 2, 2),
              Mesh(1, 1, 3, 1), Mesh(3, 1, 0, 8)]
    strategies = [Strategy(m, m.size // (tp * pp), tp, pp) for m in meshes for tp in (1, 2, 4, 8)
                  for pp in (1, 2, 4, 8) if tp <= m.n_devices and m.size % (tp * pp) == 0]
    for src, dst in itertools.product(strategies, strategies):
        cost = realloc_cost(LLAMA_7B, head, src, dst, 8, device, c, 2)
        total, worst = _missing_by_rank(LLAMA_7B, head, src, dst, 8)
        one_node = src.mesh.n_nodes == dst.mesh.n_nodes == 1 and src.mesh.first_node == dst.mesh.first_node
        link = device.intra_bandwidth if one_node else device.inter_bandwidth
        assert cost.bytes == 2 * total, (src, dst)
        assert cost.seconds == 2 * worst / (link * c.link_efficiency), (src, dst)

def test_train_memory_holds_adam_state():
    df = ppo_dataflow(LLAMA_7B, Cluster(1, 8, "H100-80GB"))
    a_tr = df.call("a_tr")
    s = Strategy(Mesh(0, 1, 0, 8), 2, 4, 1, a_tr.budget_for(2, 8))
    cost = call_cost(a_tr, df.model("actor"), s, df.cluster, device_for(df.cluster), DEFAULT_COEFFICIENTS, True)
    share = LLAMA_7B.param_count() / 4
    assert cost.static_bytes >= 12 * share  # fp32 master weights + Adam's moments, between calls
    assert cost.peak_bytes > 16 * share  # + fp32 gradients while it trains
    gen = call_cost(df.call("gen"), df.model("actor"), s, df.cluster, device_for(df.cluster), DEFAULT_COEFFICIENTS, False)
    assert 2 * share <= gen.peak_bytes < cost.peak_bytes


SMALL_SPACE = SearchSpace(n_mbs=(1, 2), recompute=False)


@pytest.mark.parametrize("devices,memory,offload", [
    (2, None, False), (2, 4_000_000, False), (4, 2_000_000, False), (2, 4_000_000, True), (4, 2_000_000, True)])
def test_cpsat_equals_brute_force(devices, memory, offload):
    """Also with offloaded options for the frozen models in the search space."""
    overrides = (("memory", memory),) if memory else ()
    df = small_dataflow(TINY, Cluster(1, devices, "cpu", overrides), batch=8, prompt_len=32, gen_len=32)
    problem = build_problem(df, space=replace(SMALL_SPACE, offload=offload))
    assert any(o.offloaded for _, opts in problem.options for o in opts) == offload
    exact = brute_force(problem)
    result = solve_cpsat(problem, time_limit=30, workers=2)
    assert result.status == "OPTIMAL"
    assert exact is not None and result.makespan == exact[1].makespan
    assert result.bound == result.makespan
    chained = mcmc(problem, budget_seconds=0.5, seed=1)
    assert chained[1].makespan >= exact[1].makespan


@pytest.mark.parametrize("move_latency", [1e-3, 1.0])
def test_cpsat_equals_brute_force_with_move_cost(move_latency):
    """A data edge whose calls run in different layouts costs the consumer's devices the
    keys' transfer plus `move_latency` per key before it computes; CP-SAT prices it exactly
    as the schedule does, and at 1 s a move no optimal plan moves data."""
    df = small_dataflow(TINY, Cluster(1, 2, "cpu"), batch=8, prompt_len=32, gen_len=32)
    problem = build_problem(df, replace(DEFAULT_COEFFICIENTS, move_latency=move_latency), space=SMALL_SPACE)
    transfer_only = {(a, b): u for a, b, u in build_problem(df, space=SMALL_SPACE).moves}
    latency = round(move_latency / DEFAULT_COEFFICIENTS.time_unit)
    assert problem.moves and all(u >= transfer_only.get((a, b), 0) + latency - 1 for a, b, u in problem.moves)
    exact = brute_force(problem)
    result = solve_cpsat(problem, time_limit=30, workers=2)
    assert result.status == "OPTIMAL" and exact is not None and result.makespan == exact[1].makespan
    if move_latency == 1.0:
        choice = dict(result.choice)
        assert all(choice[a].layout == choice[b].layout for a, b, _ in problem.moves)


def test_pins_are_respected():
    pinned = Strategy(Mesh(0, 1, 2, 2), 1, 2, 1)
    base = small_dataflow(TINY, CPU4, batch=8, prompt_len=32, gen_len=32)
    df = replace(base, pins=(Pin("refl", pinned, base.call("refl").span),))
    plan = plan_dataflow(df, time_limit=10, workers=2, space=SMALL_SPACE)
    assert plan.placement("refl").strategy == pinned
    free = plan_dataflow(base, time_limit=10, workers=2, space=SMALL_SPACE)
    assert free.iteration_time <= plan.iteration_time


def test_plan_json_round_trip_and_stable():
    df = small_dataflow(TINY, CPU4, batch=8, prompt_len=32, gen_len=32)
    first = plan_dataflow(df, time_limit=20, workers=1, space=SMALL_SPACE)
    second = plan_dataflow(df, time_limit=20, workers=1, space=SMALL_SPACE)
    assert first.status == "OPTIMAL"
    assert first.to_json() == second.to_json()
    assert Plan.from_json(first.to_json(include_timing=True)) == first
    assert Plan.from_json(first.to_json()) == replace(first, solve_seconds=0.0)
    assert first.iteration_time <= first.baseline_time
    assert '"token_budget": ' in first.to_json() and '"n_mbs"' not in first.to_json()  # the decision, not its count
    older = first.to_json().replace('"schema_version": 4', '"schema_version": 3')
    with pytest.raises(ValueError, match=r"schema version 3, expected 4: plan the program again"):
        Plan.from_json(older)


def test_frozen_models_are_offloaded_only_when_memory_needs_it():
    """4 x 70B on 8 nodes of 45 GB A100s fits only with the frozen reference and reward
    models in host memory between iterations; 16 nodes of H100-80GB hold them resident."""
    from rlhfc.planner.explain import explain_plan

    cluster = Cluster(8, 8, "A100-80GB", (("memory", 45_000_000_000),))
    df = load_program(ROOT / "programs/ppo_70b.rlhf", cluster_override=cluster)
    space = SearchSpace(sub_node_nodes=1)  # the first node's slices: same answer, a quarter of the options
    assert solve_cpsat(build_problem(df, space=space), time_limit=30, workers=8).status == "INFEASIBLE"
    plan = plan_dataflow(df, time_limit=30, space=space)
    assert plan.status in ("OPTIMAL", "FEASIBLE") and plan.offloaded == ("ref", "reward")
    assert all(p.peak_memory <= device_for(df.cluster).plan_memory for p in plan.calls)
    assert Plan.from_json(plan.to_json()) == replace(plan, solve_seconds=0.0)
    reloads = {r.call: dict(r.terms).get("reload", 0) for r in explain_plan(df, plan, DEFAULT_COEFFICIENTS)}
    assert reloads["refl"] > 0 and reloads["score"] > 0 and reloads["a_tr"] == 0
    assert plan_dataflow(load_program(ROOT / "programs/ppo_70b.rlhf"), time_limit=20, space=space).offloaded == ()


def test_multi_worker_plans_are_byte_identical():
    """The tiny PPO job has several optimal plans that 8 racing workers used to pick
    between at random; the tie-break makes every solve return the same one."""
    df = load_program(ROOT / "programs/ppo.rlhf")
    plans = {plan_dataflow(df, workers=8).to_json() for _ in range(5)}
    assert len(plans) == 1


def test_cli_plan_smoke(tmp_path):
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", str(ROOT / "programs/ppo_7b.rlhf"), "--time-limit", "3",
                                   "--json", str(out), "--svg", str(tmp_path / "g.svg")])
    assert res.exit_code == 0, res.output
    assert "iteration time" in res.output and "a_tr" in res.output
    assert re.search(r"dp/tp/pp +budget +mbs", res.output), res.output  # the decision and its count
    plan = Plan.from_json(out.read_text())
    assert {p.call for p in plan.calls} == {"gen", "score", "refl", "vals", "a_tr", "c_tr"}
    assert (tmp_path / "g.svg").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["plan", str(ROOT / "programs/ppo_7b.rlhf"), "--cluster", "1x1:A100-40GB"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
