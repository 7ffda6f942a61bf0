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
