"""Instantiation: the `run` dataflow bound to models and datasets; sizes propagated; edges."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rlhfc_runtime.contract.interfaces import INTERFACES, default_interface

from rlhfc import ir
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import (
    CALL_KINDS,
    Reporter,
    Unit,
    Values,
    by_key,
    plain_value,
    suggest,
)
from rlhfc.frontend.check.rewards import check_reward_inputs
from rlhfc.frontend.check.settings import (
    check_engines,
    check_ratio_cap,
    check_rollout_logp,
    check_run_keys,
    generation_group,
    resolve,
    with_engine_logp,
)
from rlhfc.frontend.check.staleness import check_staleness


@dataclass(frozen=True)
class KeyInfo:
    """Sequences per iteration and token lengths carried by one data key."""

    rows: int
    prompt_len: int
    gen_len: int
    group: int = 1  # samples per prompt of the rollout these rows come from
    sequences_per_row: int = 1  # 2 for chosen/rejected pairs: a row holds both


def run_config(run: ast.RunStmt, rep: Reporter, val: Values) -> ir.RunConfig:
    opts = by_key(run.options, rep, "`run`")
    batch, steps = 1, 1
    if "batch" not in opts:
        rep.error("E024", "`run` needs `batch` (prompts per iteration)", run.span, "run NAME(...) { batch = 64 }")
    params = []
    for key, opt in opts.items():
        if key in ("batch", "steps", "max_new_tokens", "group_size", "seed", "save_every", "keep", "max_staleness"):
            number = val.positive_int(opt) if key not in ("seed", "max_staleness") else val.natural(opt)
            if key == "batch":
                batch = number or 1
            elif key == "steps":
                steps = number or 1
            elif number is not None:
                params.append((key, number))
        else:
            value = val.plain(opt)
            if value is not None:
                params.append((key, value))
    return ir.RunConfig(run.dataflow.text, batch, steps, tuple(params), run.span)


def instantiate(unit: Unit, run: ast.RunStmt, models: dict[str, ir.Model], datasets: dict[str, ir.Dataset],
                 config: ir.RunConfig, rep: Reporter, device: str | None = None
                 ) -> tuple[tuple[ir.Call, ...], tuple[ir.Edge, ...], set[str]]:
    """The run's dataflow bound to this program's models and datasets: (calls, edges, all call names).

    Calls whose binding failed are left out of `calls` but kept in the names, so that
    pins on them are still checked.
    """
    if run.dataflow.text not in unit.dataflows:
        rep.error("E002", f"undefined dataflow `{run.dataflow.text}`", run.dataflow.span,
                  suggest(run.dataflow.text, unit.dataflows) or 'import it: import ppo from "stdlib/ppo.rlhf"')
        return (), (), set()
    _, decl = unit.dataflows[run.dataflow.text]
    if len(run.args) != len(decl.params):
        rep.error("E013", f"`{decl.name.text}` takes {len(decl.params)} arguments but `run` gives {len(run.args)}",
                  run.dataflow.span, f"parameters: {', '.join(p.text for p in decl.params)}")
        return (), (), {c.name.text for c in decl.calls}
    binding: dict[str, str] = {}
    model_params = {c.model.text for c in decl.calls}
    data_params = {k.text for c in decl.calls for k in c.inputs}
    ok = True
    for param, arg in zip(decl.params, run.args):
        binding[param.text] = arg.text
        is_model = param.text in model_params
        if arg.text not in models and arg.text not in datasets:
            rep.error("E002", f"undefined name `{arg.text}`", arg.span,
                      suggest(arg.text, list(models) + list(datasets)) or "declare it with `model` or `dataset`")
            ok = False
        elif is_model and arg.text not in models:
            rep.error("E023", f"parameter `{param.text}` of `{decl.name.text}` is a model, but `{arg.text}` is a dataset",
                      arg.span)
            ok = False
        elif param.text in data_params and arg.text in models:
            rep.error("E023", f"parameter `{param.text}` of `{decl.name.text}` is data, but `{arg.text}` is a model",
                      arg.span)
            ok = False
    arg_span = {p.text: a.span for p, a in zip(decl.params, run.args)}
    names = {c.name.text for c in decl.calls}
    calls = []
    for call in decl.calls:
        model = models.get(binding.get(call.model.text, ""))
        if model is None or call.kind.text not in CALL_KINDS:
            ok = False
            continue
        built = _bind_call(call, model, binding, config, arg_span[call.model.text], rep)
        ok = ok and built is not None
        if built is not None:
            calls.append(built)
    if not ok or rep.has_errors:
        return tuple(calls), (), names
    _one_train_per_model(calls, rep)
    calls = with_engine_logp(_sized(tuple(calls), datasets, binding, config, device))
    check_run_keys(run, calls, rep)
    check_engines(run, decl.calls, calls, models, device, rep)
    check_ratio_cap(run, decl.calls, calls, rep)
    check_rollout_logp(run, decl.calls, calls, rep)
    check_staleness(run, config, calls, rep)
    too_long = set()  # one error per model: its first call that does not fit
    for call in calls:
        shape = models[call.model].shape
        if shape is not None and call.seq_len > shape.max_positions and call.model not in too_long:
            too_long.add(call.model)
            rep.error("E026", f"call `{call.name}` needs {call.prompt_len} prompt + {call.gen_len} generated = "
                              f"{call.seq_len} positions, but `{call.model}` has max_positions {shape.max_positions}",
                      run.span, "lower the dataset's max_len or max_new_tokens, or use a longer-context model")
    return calls, _edges(calls, models), names


def _one_train_per_model(calls: list[ir.Call], rep: Reporter) -> None:
    """E028 at every train call after a model's first: a model has one optimizer and one
    home layout, owned by its train call, and one parameter version per iteration."""
    first: dict[str, ir.Call] = {}
    for call in calls:
        if call.kind is not ir.CallKind.TRAIN:
            continue
        if call.model not in first:
            first[call.model] = call
            continue
        rep.error("E028", f"call `{call.name}` trains `{call.model}`, which `{first[call.model].name}` already trains: "
                          f"one train call per model per iteration (its optimizer step and home layout belong "
                          f"to that call; a second update of the same parameters is not supported)", call.span,
                  "combine the objectives in one interface, or train a separate copy of the model")


def _bind_call(call: ast.CallStmt, model: ir.Model, binding: dict[str, str], config: ir.RunConfig,
               arg_span: ir.Span, rep: Reporter) -> ir.Call | None:
    """One call bound to a model: interface, head, trainability; sizes come later."""
    kind = ir.CallKind(call.kind.text)
    where = f"call `{call.name.text}` ({call.model.text} = `{model.name}`)"
    if model.kind == ir.ModelKind.RULE:
        if kind is not ir.CallKind.INFERENCE or call.interface is not None:
            rep.error("E012", f"{where}: a rule model only supports `inference` with its own rule", arg_span,
                      f"`{model.name}` is rule(\"{model.rule}\"); bind a llama model here instead")
            return None
        check_reward_inputs(call, model, binding, rep)
        interface = "rule"
    else:
        interface = call.interface.text if call.interface else default_interface(kind, model.head, False)
        iface = INTERFACES.get(interface or "")
        if iface is None:
            return None  # reported by the structural check
        if call.interface is None and kind is ir.CallKind.INFERENCE and len(call.inputs) != len(iface.inputs):
            # the head's default interface takes `seq` only (the structural check let scores through)
            rep.error("E010", f"`{call.name.text}` has {len(call.inputs)} inputs but {interface} takes "
                              f"{len(iface.inputs)}", call.inputs[len(iface.inputs)].span,
                      f"inputs: {', '.join(iface.inputs)}; only a python(...) reward combines other scores")
            return None
        if iface.head is not None and iface.head is not model.head:
            rep.error("E011", f"{where}: interface `{interface}` needs a `head = {iface.head.value}` model, "
                              f"`{model.name}` has `head = {model.head.value}`", arg_span,
                      f"bind a {iface.head.value}-head model, or set `head = {iface.head.value}` on `{model.name}`")
            return None
    if kind is ir.CallKind.TRAIN and not model.trainable:
        rep.error("E007", f"{where} trains model `{model.name}`, which is frozen", arg_span,
                  f"add `{{ trainable  optimizer = adam(lr = 1e-6) }}` to `model {model.name}`")
        return None
    options = tuple((o.key.text, plain_value(o.value)) for o in call.options or () if plain_value(o.value) is not None)
    gen_len = dict(options).get("max_new_tokens", config.param("max_new_tokens"))
    if kind is ir.CallKind.GENERATE and gen_len is None:
        rep.error("E024", f"generate call `{call.name.text}` needs `max_new_tokens`", call.span,
                  "set it in the `run` block or in the call's options")
        return None
    return ir.Call(call.name.text, model.name, kind, tuple(binding.get(k.text, k.text) for k in call.inputs),
                   tuple(k.text for k in call.outputs), interface, options, 0, 0, int(gen_len or 0), call.span)


def _topological(calls: tuple[ir.Call, ...]) -> list[ir.Call]:
    producer = {k: c.name for c in calls for k in c.outputs}
    done: set[str] = set()
    order: list[ir.Call] = []
    pending = list(calls)
    while pending:
        ready = [c for c in pending if all(producer.get(k) in done or k not in producer for k in c.inputs)]
        if not ready:  # a cycle: reported by the structural check, never sized
            break
        order += ready
        done |= {c.name for c in ready}
        pending = [c for c in pending if c.name not in done]
    return order


def _sized(calls: tuple[ir.Call, ...], datasets: dict[str, ir.Dataset], binding: dict[str, str],
           config: ir.RunConfig, device: str | None = None) -> tuple[ir.Call, ...]:
    """Batch, prompt and generation lengths of every call, propagated along data keys.

    A dataset key carries `batch` rows (a chosen/rejected row holds 2 sequences); a
    `generate` multiplies its rows by its group size (`settings.generation_group`);
    every other call sees the largest row count and lengths among its inputs. A call's
    `batch` counts sequences (what its cost depends on), its `rows` setting the data
    rows the runtime holds. Each call's settings are resolved here, once
    (`settings.resolve`).
    """
    keys: dict[str, KeyInfo] = {}
    for name in set(binding.values()) & set(datasets):
        ds = datasets[name]
        fields = {k for k, _ in ds.fields}
        pairs = {"chosen", "rejected"} <= fields
        # responses (SFT, pairs) keep max_len tokens plus eos after the prompt's max_len,
        # padded to that width by the loader: the length every such step runs
        response = ds.max_len + 1 if pairs or "response" in fields else 0
        keys[name] = KeyInfo(config.batch, ds.max_len, response, sequences_per_row=2 if pairs else 1)
    sized = {}
    for call in _topological(calls):
        ins = [keys[k] for k in call.inputs if k in keys] or [KeyInfo(config.batch, 0, 0)]
        widest = max(ins, key=lambda i: i.rows * i.sequences_per_row)
        rows, per_row = widest.rows, widest.sequences_per_row
        prompt_len, gen_len = max(i.prompt_len for i in ins), max(i.gen_len for i in ins)
        group = max(i.group for i in ins)
        if call.kind is ir.CallKind.GENERATE:
            group = generation_group(call, config)
            rows *= group
            gen_len = call.gen_len
        for out in call.outputs:
            keys[out] = KeyInfo(rows, prompt_len, gen_len, group, 1 if call.kind is ir.CallKind.GENERATE else per_row)
        call = replace(call, batch=rows * per_row, prompt_len=prompt_len, gen_len=gen_len)
        sized[call.name] = replace(call, settings=resolve(call, config, group, device, rows))
    return tuple(sized[c.name] for c in calls)


def _edges(calls: tuple[ir.Call, ...], models: dict[str, ir.Model]) -> tuple[ir.Edge, ...]:
    """Data edges (producer → consumer per key) and parameter-version edges of trainable models."""
    producer = {k: c.name for c in calls for k in c.outputs}
    edges = [ir.Edge(producer[k], c.name, ir.EdgeKind.DATA, k) for c in calls for k in c.inputs if k in producer]
    for model in sorted({c.model for c in calls}):
        if not models[model].trainable:
            continue
        trains = [c.name for c in calls if c.model == model and c.kind is ir.CallKind.TRAIN]
        others = [c.name for c in calls if c.model == model and c.kind is not ir.CallKind.TRAIN]
        for t in trains:
            edges += [ir.Edge(o, t, ir.EdgeKind.PARAM, model) for o in others]
            edges += [ir.Edge(t, o, ir.EdgeKind.PARAM, model, next_iteration=True) for o in others]
    return tuple(edges)
