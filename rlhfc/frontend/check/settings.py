"""Settings: every value a call's runtime code reads, resolved once here (call option >
run block > the contract's default) and checked against the contract's types and ranges.
The op carries the result; the runtime re-derives nothing.
"""

from __future__ import annotations

from dataclasses import replace

from rlhfc_runtime.contract.engines import ENGINES, OWN, engine_problem
from rlhfc_runtime.contract.interfaces import (
    ENGINE_LOGP,
    ENGINE_LOGP_OF,
    INTERFACES,
    NO_CORRECTION,
    TIS,
    Setting,
    default_precision,
    recomputes_old_logp,
)

from rlhfc import ir
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import Reporter, describe, plain_value, suggest, value_text

# Keys of the `run` block that are the job's, not a call's.
RUN_KEYS = ("batch", "steps", "seed", "save_every", "keep", "max_new_tokens", "max_staleness")


def call_settings(call: ir.Call) -> tuple[Setting, ...]:
    """The settings `call` reads: its interface's (and its kind's, for generate)."""
    iface = INTERFACES.get(call.interface)
    if iface is not None:
        return iface.all_settings()
    return ()  # rule rewards read only what `resolve` adds


def resolve(call: ir.Call, config: ir.RunConfig, rollout_group: int,
            device: str | None = None, rows: int | None = None) -> tuple[tuple[str, int | float | str], ...]:
    """The resolved settings of a sized call. `rows` is the global row count it produces
    (generate) or processes (default `call.batch`; fewer when a row holds a chosen/
    rejected pair); `rollout_group` the samples per prompt of its inputs; `device` the
    cluster's device name (the default precision depends on it)."""
    rows = call.batch if rows is None else rows
    out: dict[str, int | float | str] = {"rows": rows}
    settings = call_settings(call)
    for setting in sorted(settings, key=lambda s: s.fallback is not None):  # fallbacks after their source
        if setting.name == "group_size":
            value = generation_group(call, config) if call.kind is ir.CallKind.GENERATE else rollout_group
        elif setting.name == "precision":
            value = call.option("precision", config.param("precision", default_precision(device)))
        else:
            default = out[setting.fallback] if setting.fallback else setting.default
            value = call.option(setting.name, config.param(setting.name, default))
        try:
            out[setting.name] = setting.type(value)
        except (TypeError, ValueError):  # a value of the wrong kind: `check_run_keys` reports it (E022)
            out[setting.name] = setting.default
    out = {"rows": rows, **{s.name: out[s.name] for s in settings}}
    if call.kind is ir.CallKind.GENERATE or call.interface == "rule" or "loss_agg" in out:
        out["max_new_tokens"] = call.gen_len  # seq-mean-token-sum-norm divides by it
    if call.kind is ir.CallKind.TRAIN:
        out["steps"] = config.steps  # the run's length: learning-rate schedules span it
    return tuple(out.items())


def generation_group(call: ir.Call, config: ir.RunConfig) -> int:
    """Samples per prompt of a generate call: its option, else the run's for sampling
    (`generate`), else 1 (greedy decoding draws one response per prompt)."""
    default = config.param("group_size", 1) if call.interface == "generate" else 1
    return int(call.option("group_size", default))


def check_run_keys(run: ast.RunStmt, calls: tuple[ir.Call, ...], rep: Reporter) -> None:
    """Every run-block key is the job's or a setting some call reads, with an allowed value."""
    known: dict[str, Setting] = {}
    for call in calls:
        for setting in call_settings(call):
            known.setdefault(setting.name, setting)
    for opt in run.options or ():
        key = opt.key.text
        if key in RUN_KEYS:
            continue
        if key not in known:
            names = sorted(set(RUN_KEYS) | set(known))
            rep.error("E022", f"unknown key `{key}` in `run`: no call of this dataflow reads it", opt.key.span,
                      suggest(key, names) or f"known keys: {', '.join(names)}")
            continue
        check_value(known[key], opt, rep)


def check_value(setting: Setting, opt: ast.Option, rep: Reporter) -> None:
    """A located E022 when `opt`'s value is not allowed for `setting`."""
    problem = setting.problem(plain_value(opt.value) if not isinstance(opt.value, ast.Name) else None)
    if problem is not None:
        rep.error("E022", f"`{setting.name}` {problem}, not {describe(opt.value)} `{value_text(opt.value)}`",
                  opt.value.span, setting.doc)


def setting_option(run: ast.RunStmt, decl_call: ast.CallStmt, key: str) -> ast.Option | None:
    """Where a call's setting `key` is written: the call's option, else the run block's
    (None: it takes the contract's default)."""
    return (next((o for o in decl_call.options or () if o.key.text == key), None)
            or next((o for o in run.options or () if o.key.text == key), None))


def check_ratio_cap(run: ast.RunStmt, decl_calls, calls: tuple[ir.Call, ...], rep: Reporter) -> None:
    """E022 at `ratio_cap` where it caps no weight (off_policy = "none": the rollout's
    log-probs are the old policy, every weight is 1) or is not above 1 (it would drop
    tokens the current policy samples more often than the old one)."""
    by_name, reported = {c.name.text: c for c in decl_calls}, set()
    for call in calls:
        problem = _ratio_cap_problem(dict(call.settings))
        opt = setting_option(run, by_name[call.name], "ratio_cap")
        if problem is not None and opt is not None and opt.value.span not in reported:
            reported.add(opt.value.span)
            rep.error("E022", f"`ratio_cap` of call `{call.name}` {problem}", opt.value.span,
                      next(s.doc for s in call_settings(call) if s.name == "ratio_cap"))


def _ratio_cap_problem(settings: dict) -> str | None:
    cap = settings.get("ratio_cap", 0.0)
    if not cap:
        return None
    if not recomputes_old_logp(settings):
        return 'needs off_policy = "decoupled" or "tis"'
    return "must exceed 1 (0: off)" if cap <= 1 else None


def check_engines(run: ast.RunStmt, decl_calls, calls: tuple[ir.Call, ...], models: dict[str, ir.Model],
                  device: str | None, rep: Reporter) -> None:
    """E033 at the `engine` setting (the call's option, else the run block's key) of every
    generate call whose engine cannot run its model here (`contract.engines`)."""
    by_name = {c.name.text: c for c in decl_calls}
    for call in calls:
        engine = dict(call.settings).get("engine", OWN)
        if call.kind is not ir.CallKind.GENERATE or engine == OWN or engine not in ENGINES:
            continue  # the own loop runs every model; an unknown engine is E022 (`check_run_keys`)
        opt = setting_option(run, by_name[call.name], "engine")
        problem = engine_problem(str(engine), models[call.model].shape, device)
        if problem is not None:
            rep.error("E033", f"generate call `{call.name}` cannot use engine {engine!r}: {problem}",
                      (opt.value.span if opt is not None else call.span), f'or set engine = "{OWN}" (the default)')


def engine_logp_readers(calls: tuple[ir.Call, ...]) -> dict[str, str]:
    """Train call -> the generate call whose engine's log-probs (`rollout_logp = "engine"`)
    are its `logp` input: the behaviour policy its `off_policy` correction weighs."""
    made = {}
    for call in calls:
        settings = dict(call.settings)
        if call.kind is ir.CallKind.GENERATE and settings.get("rollout_logp") == ENGINE_LOGP:
            made |= {key: call.name for key, out in zip(call.outputs, INTERFACES[call.interface].outputs)
                     if out == "logp"}
    return {call.name: made[key] for call in calls if call.kind is ir.CallKind.TRAIN and call.interface in INTERFACES
            for key, arg in zip(call.inputs, INTERFACES[call.interface].inputs) if arg == "logp" and key in made}


def with_engine_logp(calls: tuple[ir.Call, ...]) -> tuple[ir.Call, ...]:
    """Each train call that corrects for an engine's log-probs carries the generate call's
    name (`ENGINE_LOGP_OF`): it logs `logprob_diff` under that name, its own pre-update
    forward against the engine's log-probs of the same tokens."""
    readers = engine_logp_readers(calls)
    return tuple(replace(c, settings=(*c.settings, (ENGINE_LOGP_OF, readers[c.name])))
                 if c.name in readers and recomputes_old_logp(dict(c.settings)) else c for c in calls)


def check_rollout_logp(run: ast.RunStmt, decl_calls, calls: tuple[ir.Call, ...], rep: Reporter) -> None:
    """E022 at `rollout_logp = "engine"` where it cannot stand: on the own loop (its
    log-probs are the trainer's already), or read by a train call with off_policy =
    "none" (the engine's numerics would be the ratio's denominator, uncorrected)."""
    by_name, by_call, reported = {c.name.text: c for c in decl_calls}, {c.name: c for c in calls}, set()

    def report(gen: str, message: str, hint: str) -> None:
        opt = setting_option(run, by_name[gen], "rollout_logp")
        span = opt.value.span if opt is not None else by_call[gen].span
        if span not in reported:
            reported.add(span)
            rep.error("E022", message, span, hint)

    for call in calls:
        settings = dict(call.settings)
        if settings.get("rollout_logp") == ENGINE_LOGP and settings.get("engine", OWN) == OWN:
            report(call.name, f'`rollout_logp = "{ENGINE_LOGP}"` of generate call `{call.name}` needs another engine: '
                              f"it decodes on the own loop, whose log-probs are the trainer's",
                   'set engine = "vllm", or leave rollout_logp at its default, "trainer"')
    for train, gen in engine_logp_readers(calls).items():
        if dict(by_call[train].settings).get("off_policy") == NO_CORRECTION:
            report(gen, f'generate call `{gen}` keeps its engine\'s log-probs (`rollout_logp = "{ENGINE_LOGP}"`), and '
                        f'train call `{train}` would take them as its ratio\'s old log-probs (off_policy = '
                        f'"{NO_CORRECTION}"): the engine\'s numerics would enter the ratio uncorrected',
                   f'set off_policy = "{TIS}" on `{train}` (its own forward gives the ratio\'s old log-probs and '
                   f"each token is weighted by min(pi_old / pi_engine, tis_cap)), or rollout_logp = \"trainer\"")
