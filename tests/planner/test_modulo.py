"""The steady-state (modulo) planner of `max_staleness` K ≥ 1: CP-SAT against brute force
on small cyclic cases, the plan's schedule checked constraint by constraint, the
synchronous fallback, the JSON and the CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from planner_fixtures import PPO_CALLS, TINY, _model, dataflow_from, small_dataflow
from typer.testing import CliRunner

from rlhfc.cli import app
from rlhfc.frontend.check import load_program
from rlhfc.ir import CallKind, Cluster, Dataflow, EdgeKind, Head, ModelKind
from rlhfc.plan import Plan
from rlhfc.planner.solve import SearchSpace, build_problem, plan_dataflow
from rlhfc.planner.solve.baselines import brute_force, brute_force_modulo
from rlhfc.planner.solve.modulo import solve_modulo

ROOT = Path(__file__).resolve().parents[2]
# one micro-batch per replica, no other budget: the cases below are sized for this space
ONE_MBS = SearchSpace(n_mbs=(1,), recompute=False, fit_budget=False)

# generate, a frozen model's inference, train: the smallest cycle through the weights
THREE_CALLS = (PPO_CALLS[0], PPO_CALLS[2], ("a_tr", "actor", CallKind.TRAIN, ("seq", "logp", "ref_logp"), ()))


def _three_calls(devices: int, memory: int | None) -> Dataflow:
    overrides = (("memory", memory),) if memory else ()
    models = (_model("actor", TINY, Head.LM, True), _model("ref", TINY, Head.LM, False))
    return dataflow_from(THREE_CALLS, models, Cluster(1, devices, "cpu", overrides), 8, 32, 32)


def _staleness(df: Dataflow, k: int) -> Dataflow:
    return replace(df, run=replace(df.run, params=df.run.params + (("max_staleness", k),)))


@pytest.mark.parametrize("devices,memory,k", [
    (2, None, 1), (2, 4_000_000, 1), (2, 6_000_000, 1), (4, None, 1), (4, 4_000_000, 1), (2, None, 2), (4, None, 2)])
def test_modulo_cpsat_equals_brute_force(devices, memory, k):
    """Options × ahead × orders of the offsets, II bisected per order, against CP-SAT;
    both capped by the synchronous optimum, as `plan_dataflow` caps the steady state."""
    problem = build_problem(_three_calls(devices, memory), space=ONE_MBS)
    sync = brute_force(problem)
    exact = brute_force_modulo(problem, k, sync[1].makespan)
    result = solve_modulo(problem, k, 30, 2, 0, sync)
    assert result.status == "OPTIMAL" and result.interval == exact[1] == result.bound


def test_modulo_cpsat_equals_brute_force_four_calls():
    problem = build_problem(small_dataflow(TINY, Cluster(1, 2, "cpu"), batch=8, prompt_len=32, gen_len=32),
                            space=replace(ONE_MBS, n_mbs=(1, 2)))
    sync = brute_force(problem)
    exact = brute_force_modulo(problem, 1, sync[1].makespan)
    result = solve_modulo(problem, 1, 30, 2, 0, sync)
    assert result.status == "OPTIMAL" and result.interval == exact[1] < sync[1].makespan


def _assert_valid_steady_state(df: Dataflow, plan: Plan) -> None:
    """The plan's windows obey every constraint of the modulo model: ahead in [0, K],
    train calls 0; data edges within an iteration; on each device, no two windows
    overlap modulo II (reallocations included, on the receiving and the home's devices);
    a reader of a trained model starts, reallocation included, no earlier than
    end(train) − (1 + K)·II."""
    ii, k = plan.iteration_time, plan.max_staleness
    eps = 1e-6
    realloc = {r.before_call: r for r in plan.reallocations}
    begin = {p.call: p.start - (realloc[p.call].seconds if p.call in realloc else 0.0) for p in plan.calls}
    for p in plan.calls:
        assert 0 <= p.ahead <= k and (p.ahead == 0 or df.call(p.call).kind is not CallKind.TRAIN)
    for e in df.edges:
        if e.kind is EdgeKind.DATA and not e.next_iteration:
            assert begin[e.dst] >= plan.placement(e.src).end - eps, e
    busy: dict[int, list[tuple[float, float]]] = {}
    dpn = plan.cluster.devices_per_node
    for p in plan.calls:
        if df.model(p.model).kind != ModelKind.RULE:
            for d in p.strategy.mesh.ranks(dpn):
                busy.setdefault(d, []).append((begin[p.call], p.end))
    for r in plan.reallocations:
        home = plan.home(r.model)
        for d in set(home.mesh.ranks(dpn)) - set(r.dst.mesh.ranks(dpn)):
            busy.setdefault(d, []).append((begin[r.before_call], begin[r.before_call] + r.seconds))
    for windows in busy.values():
        for i, (a0, a1) in enumerate(windows):
            assert a1 - a0 <= ii + eps
            for b0, b1 in windows[i + 1:]:
                shift = (b0 - a0) % ii  # b's start in a's body
                assert shift >= (a1 - a0) - eps and ii - shift >= (b1 - b0) - eps, windows
    for tr in (c for c in df.calls if c.kind is CallKind.TRAIN):
        for reader in (c for c in df.calls if c.model == tr.model and c is not tr):
            assert begin[reader.name] + (1 + k) * ii >= plan.placement(tr.name).end - eps


@pytest.mark.parametrize("program", ["grpo", "ppo"])
def test_two_process_programs_pipeline_on_disjoint_devices(program):
    """On 2 processes the steady state generates the next step's rollouts while this step
    trains, faster than the synchronous plan: GRPO generates on one device while the
    other trains; PPO trains the critic beside the next generation."""
    df = _staleness(load_program(ROOT / f"programs/{program}.rlhf"), 1)
    plan = plan_dataflow(df, time_limit=10, workers=2)
    assert plan.max_staleness == 1 and plan.sync_time is not None
    assert plan.iteration_time < plan.sync_time
    gen, train = plan.placement("gen"), plan.placement("a_tr")
    assert gen.ahead == 1 and train.ahead == 0
    if program == "grpo":
        assert not set(gen.strategy.mesh.ranks(2)) & set(train.strategy.mesh.ranks(2))
    assert plan.lower_bound <= plan.iteration_time
    _assert_valid_steady_state(df, plan)
    assert Plan.from_json(plan.to_json(include_timing=True)) == plan


def test_pipelining_that_gains_nothing_keeps_the_synchronous_plan():
    """At 4 MB per device only one layout of the train call fits, and no steady state
    beats the synchronous makespan: the plan is the synchronous one, every call 0 ahead."""
    base = _three_calls(2, 4_000_000)
    sync = plan_dataflow(base, time_limit=20, workers=2, space=ONE_MBS)
    plan = plan_dataflow(_staleness(base, 1), time_limit=20, workers=2, space=ONE_MBS)
    assert plan.status == "OPTIMAL" and all(p.ahead == 0 for p in plan.calls)
    assert plan.iteration_time == plan.sync_time == sync.iteration_time
    assert [p.strategy for p in plan.calls] == [p.strategy for p in sync.calls]


def test_synchronous_plans_carry_no_steady_state():
    plan = plan_dataflow(_three_calls(2, None), time_limit=20, workers=2, space=ONE_MBS)
    assert plan.max_staleness == 0 and plan.sync_time is None and all(p.ahead == 0 for p in plan.calls)


def test_cli_shows_the_steady_state(tmp_path):
    source = (ROOT / "programs/grpo.rlhf").read_text().replace("seed = 1", "seed = 1  max_staleness = 1")
    source = source.replace('"../', f'"{ROOT}/').replace('"stdlib/', f'"{ROOT}/stdlib/')
    program = tmp_path / "grpo_k1.rlhf"
    program.write_text(source)
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", str(program), "--time-limit", "10", "--workers", "2",
                                   "--json", str(out), "--svg", str(tmp_path / "g.svg")])
    assert res.exit_code == 0, res.output
    assert "steady state" in res.output and "synchronous plan" in res.output and "ahead" in res.output
    plan = Plan.from_json(out.read_text())
    assert plan.max_staleness == 1 and plan.sync_time > plan.iteration_time
    assert "gen[2]" in (tmp_path / "g.svg").read_text()
