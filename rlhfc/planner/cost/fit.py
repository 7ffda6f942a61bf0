"""Fitting the cost model's coefficients to measured call times (`rlhfc calibrate`).

A run records, beside its metrics, what the cost model needs to price each call again
(`cost_inputs.json`: the call's sizes, its model's shape, its strategy, the cluster).
The fit re-prices every call with `call_cost` itself, so a fitted `Coefficients` means
exactly what the planner will compute with it. Residuals are relative (log of predicted
over measured), because call times span orders of magnitude; a Huber weight keeps one
noisy call from dragging the fit, and a weak pull towards the starting values keeps
coefficients that the runs do not exercise (dp all-reduce on one process) where they were.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS, Coefficients
from rlhfc.planner.cost.engine import engine_of
from rlhfc.planner.cost.model import call_cost
from rlhfc.hardware import device_for, read_json
from rlhfc.ir import Call, CallKind, Cluster, Head, Model, ModelShape, Span, Strategy
from rlhfc_runtime.contract.engines import OWN

COEFFICIENTS_SCHEMA_VERSION = 2  # 2: memory figures left the time coefficients
COST_INPUTS_SCHEMA_VERSION = 2  # 2: a strategy's `token_budget` in place of its `n_mbs`
COST_INPUTS_FILE = "cost_inputs.json"

# The time coefficients a run's call times can tell apart; byte sizes stay analytical.
FIT_FIELDS: tuple[str, ...] = (
    "compute_efficiency", "mem_bandwidth_efficiency", "link_efficiency", "collective_latency",
    "micro_batch_overhead", "decode_step_overhead",
    # vLLM's decode (`cost.engine.decode_terms`): only runs with `engine = "vllm"` move them
    "engine_compute_efficiency", "engine_bandwidth_efficiency", "engine_step_overhead",
)
# Coefficients whose zero means "left out" rather than an impossible value.
MAY_BE_ZERO: tuple[str, ...] = ("driver_op_overhead", "decode_layer_overhead", "realloc_bucket_latency", "move_latency")
_SPAN = Span("<run>", 0, 0, 0, 0)


class FitError(ValueError):
    """Bad input to calibration (a missing or malformed file): shown without a traceback."""


# ---- coefficients files -------------------------------------------------------------


def coefficients_to_json(c: Coefficients) -> str:
    """Versioned JSON of every coefficient (sorted keys, stable)."""
    doc = {"schema_version": COEFFICIENTS_SCHEMA_VERSION, "coefficients": asdict(c)}
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def load_coefficients(path: str | Path) -> Coefficients:
    """Coefficients from `coefficients_to_json` (or the `coefficients` block of a hardware
    profile); fields not in the file keep their defaults."""
    doc = read_json(path, "coefficients file", FitError)
    known = {f.name for f in fields(Coefficients)}
    version = doc.get("coefficients_schema_version", doc.get("schema_version"))
    values = doc.get("coefficients") if version == COEFFICIENTS_SCHEMA_VERSION else None
    if not isinstance(values, dict):
        raise FitError(f"{path}: not a coefficients file (schema version {COEFFICIENTS_SCHEMA_VERSION} "
                       f"with a `coefficients` object); write one with `rlhfc calibrate --out`")
    bad = sorted(k for k, v in values.items() if k not in known or not isinstance(v, (int, float))
                 or v < 0 or (v == 0 and k not in MAY_BE_ZERO))
    if bad:
        raise FitError(f"{path}: unknown or non-positive coefficient(s) {bad}")
    return replace(DEFAULT_COEFFICIENTS, **values)


# ---- what a run records for the fit ---------------------------------------------------


@dataclass(frozen=True)
class PricedCall:
    """Everything `call_cost` needs to price one call of a run again."""

    call: Call
    model: Model
    strategy: Strategy
    cluster: Cluster
    is_home: bool

    def seconds(self, c: Coefficients) -> float:
        return call_cost(self.call, self.model, self.strategy, self.cluster, device_for(self.cluster), c,
                         self.is_home).seconds


@dataclass(frozen=True)
class Sample:
    """One call of one run: its inputs and its measured median seconds."""

    run: str
    priced: PricedCall
    measured: float

    @property
    def name(self) -> str:
        return f"{self.run}:{self.priced.call.name}"


def cost_inputs_json(prog) -> str:
    """The cost inputs of every neural call of a lowered plan (`rlhfc.backend.lower.OpProgram`),
    for `rlhfc calibrate` to price again."""
    from rlhfc.plan import _strategy_dict
    from rlhfc.planner.solve.problem import home_calls

    dataflow, plan = prog.dataflow, prog.plan
    homes = home_calls(dataflow)
    c = dataflow.cluster
    calls = []
    for p in plan.calls:
        call, model = dataflow.call(p.call), dataflow.model(p.model)
        if model.shape is None:
            continue
        calls.append({
            "call": call.name, "kind": call.kind.value, "batch": call.batch, "prompt_len": call.prompt_len,
            "gen_len": call.gen_len, "engine": engine_of(call), "model": model.name, "head": model.head.value,
            "shape": asdict(model.shape), "strategy": _strategy_dict(p.strategy), "is_home": homes.get(model.name) == call.name,
        })
    doc = {"schema_version": COST_INPUTS_SCHEMA_VERSION, "driver_ops": driver_ops(prog),
           "cluster": {"nodes": c.nodes, "devices_per_node": c.devices_per_node, "device": c.device,
                       "overrides": [[k, v] for k, v in c.overrides]},
           "calls": calls}
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def driver_ops(prog) -> int:
    """Ops of a lowered iteration (`rlhfc.backend.lower.OpProgram`) other than neural calls: data
    loads, data moves between meshes, rule-reward calls, reallocations and drops. Each is a
    step of the driver's loop whose fixed cost (Python, dispatch, synchronisation) the
    schedule does not price (it prices only a move's bytes and a reallocation's copy)."""
    from rlhfc_runtime.contract.ops import Call as CallOp

    return sum(1 for op in prog.ops
               if not (isinstance(op, CallOp) and prog.dataflow.model(op.model).shape is not None))


def priced_calls(path: str | Path) -> dict[str, PricedCall]:
    """Call name -> PricedCall, read from a run's `cost_inputs.json`."""
    from rlhfc.plan import _strategy_from

    doc = read_json(path, "cost inputs", FitError)
    if doc.get("schema_version") != COST_INPUTS_SCHEMA_VERSION:
        raise FitError(f"{path}: cost inputs schema version {doc.get('schema_version')!r}, expected {COST_INPUTS_SCHEMA_VERSION}")
    try:
        cl = doc["cluster"]
        cluster = Cluster(cl["nodes"], cl["devices_per_node"], cl["device"], tuple((k, v) for k, v in cl["overrides"]))
        out = {}
        for d in doc["calls"]:
            engine = (("engine", d["engine"]),) if d["engine"] != OWN else ()
            call = Call(d["call"], d["model"], CallKind(d["kind"]), (), (), "", (), d["batch"], d["prompt_len"],
                        d["gen_len"], _SPAN, engine)
            model = Model(d["model"], "llama", ModelShape(**d["shape"]), Head(d["head"]), False, None, None, None, _SPAN)
            out[call.name] = PricedCall(call, model, _strategy_from(d["strategy"]), cluster, d["is_home"])
    except (KeyError, TypeError, ValueError) as e:
        raise FitError(f"{path}: malformed cost inputs ({type(e).__name__}: {e})") from None
    return out


def samples_from_run(metrics: str | Path, skip: int = 1) -> list[Sample]:
    """Per-call samples of one run: the median of `time/<call>` over its steps (the first
    `skip` steps are warm-up and left out when there are more), with the run's cost inputs."""
    metrics = Path(metrics)
    inputs = metrics.parent / COST_INPUTS_FILE
    if not inputs.exists():
        raise FitError(f"{metrics}: no {COST_INPUTS_FILE} beside it; runs record it from this version of `rlhfc run` on")
    priced = priced_calls(inputs)
    try:
        records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise FitError(f"cannot read metrics {metrics}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise FitError(f"metrics {metrics} is not JSON lines: {e}") from None
    records = records[skip:] if len(records) > skip else records
    expected = response_length(records)
    out = []
    for name, p in priced.items():
        times = [r[f"time/{name}"] for r in records if f"time/{name}" in r]
        if expected and p.call.gen_len:  # price what the calls saw: the responses the run generated
            p = replace(p, call=replace(p.call, settings=(*p.call.settings, ("response_len", expected))))
        if times:
            out.append(Sample(metrics.parent.name, p, statistics.median(times)))
    return out


def response_length(records: list[dict]) -> int:
    """The run's expected response length: the median over steps and generate calls of
    the mean tokens a response had (`CALL/response_len`); 0 when nothing generated."""
    lengths = [v for r in records for k, v in r.items() if k.endswith("/response_len")]
    return max(1, round(statistics.median(lengths))) if lengths else 0


def calibrate_runs(metrics: list[str | Path], start: Coefficients = DEFAULT_COEFFICIENTS
                   ) -> tuple[list[Sample], Coefficients]:
    """What `rlhfc calibrate` fits: every run's per-call samples (`samples_from_run`), the
    coefficients fitted to them from `start` (`fit_coefficients`), and `move_latency` the
    median of the runs' measured data moves (`move_times`; `start`'s when none moved)."""
    samples = [s for path in metrics for s in samples_from_run(path)]
    fitted = fit_coefficients(samples, start)
    moves = [t for path in metrics for t in move_times(path)]
    return samples, replace(fitted, move_latency=statistics.median(moves)) if moves else fitted


def move_times(metrics: str | Path, skip: int = 1) -> list[float]:
    """Seconds of every data move a run measured (`time/move KEY SRC->DST`), on every
    step after the first `skip`; a move is a fixed cost at these sizes (its bytes take
    microseconds), so the planner prices each as `move_latency`."""
    try:
        records = [json.loads(ln) for ln in Path(metrics).read_text().splitlines() if ln.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise FitError(f"cannot read metrics {metrics}: {e}") from None
    records = records[skip:] if len(records) > skip else records
    return [v for r in records for k, v in r.items() if k.startswith("time/move ")]


# ---- the fit -------------------------------------------------------------------------


def _log_residuals(samples: list[Sample], c: Coefficients) -> list[float]:
    return [math.log(max(s.priced.seconds(c), 1e-12) / s.measured) for s in samples]


def _with_logs(base: Coefficients, names: tuple[str, ...], logs) -> Coefficients:
    return replace(base, **{n: math.exp(v) for n, v in zip(names, logs)})


def fit_coefficients(
    samples: list[Sample], start: Coefficients = DEFAULT_COEFFICIENTS, names: tuple[str, ...] = FIT_FIELDS,
    huber: float = 0.1, prior: float = 1e-3, iterations: int = 60,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> Coefficients:
    """Coefficients minimising the Huber loss of log(predicted/measured) over `samples`
    (Levenberg–Marquardt on the logs of `names`, numeric Jacobian, plus `prior`·‖log
    change‖² so that unobserved coefficients stay at `start`), each kept inside its
    `bounds` (steps are projected onto them). A sample is anything with `measured`
    seconds and `priced.seconds(coefficients)`: a call, or a whole plan's iteration."""
    import numpy as np

    if not samples:
        raise FitError("no call times to fit: the runs recorded no neural calls")
    box = bounds or {}
    lo = np.log([box.get(n, (1e-300, 1e300))[0] for n in names])
    hi = np.log([box.get(n, (1e-300, 1e300))[1] for n in names])
    x0 = np.clip(np.log([getattr(start, n) for n in names]), lo, hi)
    x, damping = x0.copy(), 1e-3

    def objective(x):
        r = np.array(_log_residuals(samples, _with_logs(start, names, x)))
        a = np.abs(r)
        loss = np.where(a <= huber, 0.5 * r * r, huber * (a - 0.5 * huber)).sum()
        return r, loss + 0.5 * prior * np.sum((x - x0) ** 2)

    r, loss = objective(x)
    for _ in range(iterations):
        h = 1e-5
        jac = np.stack([(objective(x + h * e)[0] - r) / h for e in np.eye(len(x))], axis=1)
        w = np.minimum(1.0, huber / np.maximum(np.abs(r), 1e-12))  # IRLS weights of the Huber loss
        a = jac.T @ (w[:, None] * jac) + prior * np.eye(len(x))
        g = jac.T @ (w * r) + prior * (x - x0)
        improved = False
        while damping < 1e8:
            step = np.clip(x + np.linalg.solve(a + damping * np.diag(np.diag(a) + 1e-12), -g), lo, hi) - x
            r_new, loss_new = objective(x + step)
            if loss_new < loss:
                x, r, improved = x + step, r_new, loss - loss_new > 1e-12 * max(loss, 1e-12)
                loss, damping = loss_new, max(damping / 3, 1e-9)
                break
            damping *= 4
        if not improved:
            break
    return _with_logs(start, names, x)


def fit_driver_overhead(runs: list[tuple[float, int, float]]) -> float:
    """`driver_op_overhead` from whole iterations, each (scheduled seconds, driver ops,
    measured seconds): the least-squares fit of the relative error of scheduled + k·ops
    against measured, k ≥ 0 (closed form: one coefficient, linear in k)."""
    num = sum(n / y * (1 - m / y) for m, n, y in runs if y > 0)
    den = sum((n / y) ** 2 for m, n, y in runs if y > 0)
    return max(0.0, num / den) if den else 0.0


def relative_error(predicted: float, measured: float) -> float:
    """|predicted − measured| / measured, the figure the benchmark reports."""
    return abs(predicted - measured) / measured
