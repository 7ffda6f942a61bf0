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


def _cost(name, strategy, **settings):
    df = ppo_dataflow(PRESETS["llama-2-7b"], CLUSTER)
    call = next(c for c in df.calls if c.name == name)
    call = replace(call, settings=(*call.settings, *settings.items()))
    return call_cost(call, df.model(call.model), strategy, CLUSTER, device_for(CLUSTER), DEFAULT_COEFFICIENTS, True)


def test_expected_response_length_prices_time_not_memory():
    s = Strategy(Mesh(0, 1, 0, 8), 8, 1, 1, 2)
    for name in ("gen", "refl", "a_tr"):
        full, short = _cost(name, s), _cost(name, s, response_len=32)
        assert short.seconds < 0.8 * full.seconds, name
        assert (short.static_bytes, short.transient_bytes) == (full.static_bytes, full.transient_bytes), name
        padded = _cost(name, s, response_len=32, packing="padded")
        assert padded.seconds == full.seconds, name  # a padded call computes every position


def test_pipelined_generation_is_priced_as_it_runs():
    one, two = (_cost("gen", Strategy(Mesh(0, 1, 0, 8), 1, 8 // pp, pp, m)) for pp, m in ((2, 1), (2, 2)))
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
