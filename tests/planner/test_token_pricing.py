"""Time is priced from the tokens calls really see (the expected `response_len` when
sequences are packed), memory from the micro-batch's full token budget; pipelined
generation is priced as the runtime runs it (micro-batches one after another)."""

from dataclasses import replace

from planner_fixtures import ppo_dataflow
from rlhfc.hardware import device_for
from rlhfc.ir import Cluster, Mesh, Strategy
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.cost.model import call_cost
from rlhfc.frontend.presets import PRESETS

CLUSTER = Cluster(nodes=1, devices_per_node=8, device="H100-80GB")


def _mbs(dp, n_mbs):
    """The budget that cuts each replica's rows into `n_mbs` micro-batches (every call of
    the fixture has the same rows and lengths)."""
    return ppo_dataflow(PRESETS["llama-2-7b"], CLUSTER).call("gen").budget_for(dp, n_mbs)


def _cost(name, strategy, **settings):
    df = ppo_dataflow(PRESETS["llama-2-7b"], CLUSTER)
    call = next(c for c in df.calls if c.name == name)
    call = replace(call, settings=(*call.settings, *settings.items()))
    return call_cost(call, df.model(call.model), strategy, CLUSTER, device_for(CLUSTER), DEFAULT_COEFFICIENTS, True)


def test_expected_response_length_prices_time_not_memory():
    s = Strategy(Mesh(0, 1, 0, 8), 8, 1, 1, _mbs(8, 2))
    for name in ("gen", "refl", "a_tr"):
        full, short = _cost(name, s), _cost(name, s, response_len=32)
        assert short.seconds < 0.8 * full.seconds, name
        assert (short.static_bytes, short.transient_bytes) == (full.static_bytes, full.transient_bytes), name
        padded = _cost(name, s, response_len=32, packing="padded")
        assert padded.seconds == full.seconds, name  # a padded call computes every position


def test_pipelined_generation_is_priced_as_it_runs():
    one, two = (_cost("gen", Strategy(Mesh(0, 1, 0, 8), 1, 8 // pp, pp, _mbs(1, m))) for pp, m in ((2, 1), (2, 2)))
    assert two.seconds > one.seconds  # two micro-batches decode one after the other: no overlap to win


def test_calibrate_prices_calls_at_the_responses_a_run_generated(tmp_path):
    import json

    from rlhfc.backend.lower import lower
    from rlhfc.frontend.check import load_program
    from rlhfc.planner.cost.fit import cost_inputs_json, response_length, samples_from_run
    from rlhfc.planner.solve import plan_dataflow

    df = load_program("programs/ppo.rlhf", cluster_override=Cluster(1, 2, "cpu"))
    (tmp_path / "cost_inputs.json").write_text(cost_inputs_json(lower(df, plan_dataflow(df, time_limit=5, workers=1))))
    rows = [{"step": s, "gen/response_len": 3.0 + s, "time/gen": 1.0, "time/a_tr": 1.0} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert response_length(rows[1:]) == 6  # the median of 5, 6, 7
    samples = {s.priced.call.name: s.priced for s in samples_from_run(tmp_path / "metrics.jsonl")}
    assert dict(samples["a_tr"].call.settings) == {"response_len": 6}
    full = replace(samples["a_tr"], call=replace(samples["a_tr"].call, settings=()))
    assert samples["a_tr"].seconds(DEFAULT_COEFFICIENTS) < full.seconds(DEFAULT_COEFFICIENTS)


def test_the_token_budget_decides_the_micro_batches_time_is_priced_with():
    """Memory is priced at the plan's token budget; the micro-batches that budget makes of
    the sequences a call really sees are fewer where responses are short, and the time
    pays their overheads only."""
    from rlhfc.planner.cost.model import seen_micro_batches
    from rlhfc_runtime.contract.budget import fill, micro_batches

    s = Strategy(Mesh(0, 1, 0, 8), 8, 1, 1, _mbs(8, 4))
    df = ppo_dataflow(PRESETS["llama-2-7b"], CLUSTER)
    call = next(c for c in df.calls if c.name == "a_tr")
    short = replace(call, settings=(*call.settings, ("response_len", 32)))
    assert seen_micro_batches(call, s) == 4 and seen_micro_batches(short, s) < 4
    assert _cost("a_tr", s, response_len=32).terms != _cost("a_tr", s).terms
    overhead = {k: v for k, v in _cost("a_tr", s, response_len=32).terms}["overhead"]
    assert overhead == DEFAULT_COEFFICIENTS.micro_batch_overhead * seen_micro_batches(short, s)
    lengths, budget = [10] * 7, 25
    assert micro_batches(7, 10, budget) == len(fill(lengths, budget)) - 1 == 4  # two whole sequences each


def test_the_plan_takes_the_largest_budget_that_fits_memory():
    """One train call on one device whose memory holds micro-batches of 3 sequences but
    not 4: the power-of-two ladder (8 rows cut into 1, 2, 4 or 8) leaves it 2, the plan
    takes 3 (3 micro-batches where the ladder makes 4, each paying its overhead), and its
    priced peak stays within the plan memory."""
    from planner_fixtures import TINY, _model, dataflow_from

    from rlhfc.ir import CallKind, Head
    from rlhfc.planner.solve import SearchSpace, build_problem, plan_dataflow
    from rlhfc.planner.solve.problem import make_option

    def one_train_call(memory):
        cluster = Cluster(1, 1, "cpu", (("memory", memory), ("memory_reserve", 0.0)))
        return dataflow_from((("a_tr", "actor", CallKind.TRAIN, ("prompts",), ()),),
                             (_model("actor", TINY, Head.LM, True),), cluster, 8, 32, 32)

    df = one_train_call(2**40)
    call, device = df.call("a_tr"), device_for(df.cluster)
    peak = {k: make_option(df, call, Strategy(Mesh(0, 1, 0, 1), 1, 1, 1, k * call.row_len), device,
                           DEFAULT_COEFFICIENTS, True).cost.peak_bytes for k in (3, 4)}
    assert peak[3] + 4096 < peak[4]
    df = one_train_call(peak[3] + 4096)  # 3 sequences' worth fit (the solvers count whole KiB), 4 do not
    space = SearchSpace(recompute=False)
    plan = plan_dataflow(df, time_limit=10, workers=1, space=space)
    old = plan_dataflow(df, time_limit=10, workers=1, space=replace(space, fit_budget=False))
    chosen, ladder = plan.placement("a_tr"), old.placement("a_tr")
    assert chosen.strategy.token_budget == 3 * call.row_len and call.n_mbs(chosen.strategy) == 3
    assert ladder.strategy.token_budget == 2 * call.row_len and call.n_mbs(ladder.strategy) == 4
    assert chosen.peak_memory == peak[3] <= device_for(df.cluster).plan_memory < peak[4]
    assert plan.iteration_time < old.iteration_time and plan.status == "OPTIMAL"
    budgets = {o.strategy.token_budget // call.row_len for o in build_problem(df, space=space).by_call["a_tr"]}
    assert max(budgets) == 3  # nothing larger fits
