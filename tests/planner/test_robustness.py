"""Planner robustness: any node size, the wall-clock limit over the whole planning, located
errors for implausible clusters, and the search space that real runs need (n_mbs past 8,
recompute, sub-node meshes on every node, checked hints)."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from planner_fixtures import LLAMA_7B, TINY, PPO_CALLS, _model, dataflow_from, ppo_dataflow, small_dataflow
from typer.testing import CliRunner

from rlhfc.cli import app
from rlhfc.frontend.check import check_program
from rlhfc.hardware import device_for
from rlhfc.ir import CallKind, Cluster, Head, Mesh, Strategy
from rlhfc.plan import Plan
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.cost.model import call_cost
from rlhfc.planner.solve import PlanError, SearchSpace, build_problem, plan_dataflow
from rlhfc.planner.solve.baselines import brute_force
from rlhfc.planner.solve.cpsat import solve_cpsat
from rlhfc.planner.solve.problem import enumerate_meshes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dpn", [5, 6, 7])
def test_any_devices_per_node_builds_and_every_strategy_fills_its_mesh(dpn):
    """Nodes of 5, 6 or 7 devices raised IndexError while costing reallocations."""
    problem = build_problem(ppo_dataflow(LLAMA_7B, Cluster(2, dpn, "H100-80GB")))
    assert all(opts for _, opts in problem.options)
    for _, opts in problem.options:
        for o in opts:
            s = o.strategy
            assert s.dp * s.tp * s.pp == s.mesh.size and s.mesh.n_devices % s.tp == 0


def test_two_nodes_of_six_h100_plan_four_7b_models():
    plan = plan_dataflow(ppo_dataflow(LLAMA_7B, Cluster(2, 6, "H100-80GB")), time_limit=10)
    assert plan.status in ("OPTIMAL", "FEASIBLE") and plan.iteration_time > 0
    assert plan.lower_bound <= plan.iteration_time


def many_calls(n_calls: int, cluster: Cluster):
    """PPO with n_calls − 5 reward models (each its own inference call)."""
    calls = [PPO_CALLS[0], PPO_CALLS[2], PPO_CALLS[3]]
    models = [_model("actor", LLAMA_7B, Head.LM, True), _model("critic", LLAMA_7B, Head.VALUE, True),
              _model("ref", LLAMA_7B, Head.LM, False)]
    keys = []
    for i in range(n_calls - 5):
        calls.append((f"score{i}", f"reward{i}", CallKind.INFERENCE, ("seq",), (f"score{i}",)))
        models.append(_model(f"reward{i}", LLAMA_7B, Head.VALUE, False))
        keys.append(f"score{i}")
    inputs = ("seq", "logp", "ref_logp", "values", *keys)
    calls += [("a_tr", "actor", CallKind.TRAIN, inputs, ()), ("c_tr", "critic", CallKind.TRAIN, inputs, ())]
    return dataflow_from(calls, models, cluster, 512, 128, 128)


@pytest.mark.parametrize("n_calls", [10, 30])
def test_time_limit_bounds_the_whole_planning(n_calls):
    """A 10-call dataflow took 133 s under a 10 s limit (the symmetric baseline tried 5000
    orders per strategy, CP-SAT got the limit after the building)."""
    df = many_calls(n_calls, Cluster(2, 8, "H100-80GB"))
    t0 = time.perf_counter()
    plan = plan_dataflow(df, time_limit=4, workers=2)
    assert time.perf_counter() - t0 < 4 + 1.5
    assert plan.status in ("OPTIMAL", "FEASIBLE") and len(plan.calls) == n_calls
    assert 0 < plan.lower_bound <= plan.iteration_time and 0 <= plan.gap < 1
    assert plan.baseline_time is not None


@pytest.mark.parametrize("figure, where", [
    ("nodes = 1000000  devices_per_node = 8", "1000000"),
    ("nodes = 1  devices_per_node = 4096", "4096"),
    ("nodes = 1  devices_per_node = 8  flops = 1e-300", "1e-300"),
])
def test_implausible_clusters_are_located_errors(tmp_path, figure, where):
    text = (ROOT / "programs/ppo_7b.rlhf").read_text().replace("../data", str(ROOT / "data"))
    text = re.sub(r"cluster \{[^}]*\}", f'cluster {{ {figure}  device = "H100-80GB" }}', text)
    path = tmp_path / "p.rlhf"
    path.write_text(text)
    _, diagnostics = check_program(path)
    bad = [d for d in diagnostics if d.code == "E018"]
    assert bad and "outside" in bad[0].message and bad[0].span is not None
    line = text.splitlines()[bad[0].span.line - 1]
    assert line[bad[0].span.col - 1:].startswith(where)
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["plan", str(path), "--time-limit", "5"])
    assert res.exit_code == 1 and "E018" in res.output and "Traceback" not in res.output
    assert time.perf_counter() - t0 < 10


def test_implausible_cluster_override_is_a_plan_error():
    with pytest.raises(PlanError) as e:
        plan_dataflow(ppo_dataflow(LLAMA_7B, Cluster(1_000_000, 8, "H100-80GB")), time_limit=5)
    assert "nodes" in e.value.message
    res = CliRunner().invoke(app, ["plan", str(ROOT / "programs/ppo_7b.rlhf"), "--cluster", "1x4096:H100-80GB"])
    assert res.exit_code == 1 and "devices_per_node" in res.output and "Traceback" not in res.output


def test_micro_batches_past_eight_where_memory_needs_them():
    """7B PPO with 2048-token prompts on one node of 8 x A100-40GB: the train calls need
    more than 8 micro-batches to fit (the old space, n_mbs ≤ 8 without recompute, has no
    plan at all)."""
    df = ppo_dataflow(LLAMA_7B, Cluster(1, 8, "A100-40GB"), batch=64, prompt_len=2048, gen_len=64)
    with pytest.raises(PlanError):
        plan_dataflow(df, time_limit=10, space=SearchSpace(n_mbs=(1, 2, 4, 8), recompute=False, fit_budget=False))
    plan = plan_dataflow(df, time_limit=10)
    assert df.call("a_tr").n_mbs(plan.placement("a_tr").strategy) > 8
    assert all(p.peak_memory <= device_for(df.cluster).plan_memory for p in plan.calls)


def test_sub_node_meshes_on_every_node():
    meshes = enumerate_meshes(Cluster(4, 8, "H100-80GB"), SearchSpace())
    assert {m.first_node for m in meshes if m.n_nodes == 1 and m.n_devices < 8} == {0, 1, 2, 3}
    assert Mesh(3, 1, 4, 4) in meshes and Mesh(2, 1, 6, 2) in meshes
    limited = enumerate_meshes(Cluster(4, 8, "H100-80GB"), SearchSpace(sub_node_nodes=1))
    assert {m.first_node for m in limited if m.n_devices < 8} == {0}


def test_recompute_costs_a_forward_and_saves_activations():
    df = ppo_dataflow(LLAMA_7B, Cluster(1, 8, "H100-80GB"))
    device, c = device_for(df.cluster), DEFAULT_COEFFICIENTS
    s = Strategy(Mesh(0, 1, 0, 8), 2, 4, 1, df.call("a_tr").budget_for(2, 8))
    plain = call_cost(df.call("a_tr"), df.model("actor"), s, df.cluster, device, c, True)
    again = call_cost(df.call("a_tr"), df.model("actor"), replace(s, recompute=True), df.cluster, device, c, True)
    terms, more = dict(plain.terms), dict(again.terms)
    assert more["recompute"] == pytest.approx(terms["compute"] / 3 + terms["tp"] / 2)
    assert again.seconds > plain.seconds and again.static_bytes == plain.static_bytes
    assert again.transient_bytes < plain.transient_bytes / 2  # layer inputs instead of every activation
    gen = replace(s, recompute=True)
    assert "recompute" not in dict(call_cost(df.call("gen"), df.model("actor"), s, df.cluster, device, c, False).terms)
    assert gen.recompute and not s.recompute


def test_recompute_options_equal_brute_force_and_round_trip():
    df = small_dataflow(TINY, Cluster(1, 2, "cpu", (("memory", 2_500_000),)), batch=8, prompt_len=32, gen_len=32)
    problem = build_problem(df, space=SearchSpace(n_mbs=(1, 2)))
    assert any(o.strategy.recompute for o in problem.by_call["a_tr"])
    exact = brute_force(problem)
    result = solve_cpsat(problem, time_limit=30, workers=2)
    assert result.status == "OPTIMAL" and result.makespan == exact[1].makespan
    plan = plan_dataflow(df, time_limit=10, workers=2, space=SearchSpace(n_mbs=(1, 2)))
    assert Plan.from_json(plan.to_json()) == replace(plan, solve_seconds=0.0)
    assert '"recompute": ' in plan.to_json()


def test_mini_batches_and_epochs_are_priced():
    """ReaL's PPO takes 4 mini-batches per train call: 4 optimizer steps and 4 gradient
    all-reduces, the same FLOPs; 2 epochs double the FLOPs."""
    df = ppo_dataflow(LLAMA_7B, Cluster(1, 8, "H100-80GB"))
    steps = replace(df, run=replace(df.run, params=df.run.params + (("mini_batches", 4), ("ppo_epochs", 2))))
    def eight(problem):  # a_tr's options of 8 micro-batches per (mini-)batch on each replica
        return [o for o in problem.by_call["a_tr"] if problem.dataflow.call("a_tr").n_mbs(o.strategy) == 8]

    s = next(o for o in eight(build_problem(df, space=SearchSpace(n_mbs=(8,)))) if o.strategy.dp == 2)
    one = dict(s.cost.terms)
    four = next(o for o in eight(build_problem(steps, space=SearchSpace(n_mbs=(8,))))
                if o.layout == s.layout and o.strategy.recompute == s.strategy.recompute)
    assert four.strategy.token_budget * 4 == s.strategy.token_budget  # a mini-batch is a quarter of the rows
    four = dict(four.cost.terms)
    assert four["optimizer"] == pytest.approx(8 * one["optimizer"]) and four["dp"] == pytest.approx(8 * one["dp"])
    assert four["compute"] == pytest.approx(2 * one["compute"])


def test_infeasible_hint_names_a_cluster_that_plans():
    df = ppo_dataflow(LLAMA_7B, Cluster(1, 1, "A100-40GB"))
    with pytest.raises(PlanError) as e:
        plan_dataflow(df, time_limit=5)
    named = re.search(r"call `(\w+)`", str(e.value))
    assert named and e.value.span == df.call(named.group(1)).span
    m = re.search(r"--cluster (\d+)x(\d+):(\S+)\)", e.value.hint)
    assert m, e.value.hint
    suggested = Cluster(int(m.group(1)), int(m.group(2)), m.group(3))
    assert plan_dataflow(replace(df, cluster=suggested), time_limit=10).iteration_time > 0
    with pytest.raises(PlanError):  # and it is the smallest such growth
        plan_dataflow(replace(df, cluster=replace(suggested, nodes=suggested.nodes // 2)), time_limit=10)


def test_recompute_pin(tmp_path):
    text = (ROOT / "programs/ppo_7b.rlhf").read_text().replace("../data", str(ROOT / "data"))
    path = tmp_path / "p.rlhf"
    path.write_text(text + "place a_tr on node0[0:8] dp = 2 tp = 4 pp = 1 n_mbs = 8 recompute = true\n")
    df = check_program(path)[0]
    plan = plan_dataflow(df, time_limit=5, workers=2)
    assert plan.placement("a_tr").strategy == Strategy(Mesh(0, 1, 0, 8), 2, 4, 1, df.call("a_tr").budget_for(2, 8), True)
    assert df.call("a_tr").n_mbs(plan.placement("a_tr").strategy) == 8
    path.write_text(text + "place gen on node0[0:8] dp = 2 tp = 4 pp = 1 recompute = true\n")
    assert any(d.code == "E022" and "train calls" in d.message for d in check_program(path)[1])
