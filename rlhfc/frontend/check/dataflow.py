"""Dataflow structure: names, data keys, interfaces and arities, call options, cycles (no bindings needed)."""

from __future__ import annotations

from rlhfc_runtime.contract.interfaces import INTERFACES, MODEL_SETTINGS

from rlhfc import ir
from rlhfc.frontend import ast
from rlhfc.frontend.check.settings import check_value
from rlhfc.frontend.check.common import (
    CALL_KINDS,
    CALL_KEYS,
    Reporter,
    Values,
    by_key,
    suggest,
)


def _call_interface(call: ast.CallStmt) -> str | None:
    """The interface a call names, or the head-independent default for its kind."""
    if call.interface is not None:
        return call.interface.text
    kind = call.kind.text
    return "generate" if kind == "generate" else None


def check_dataflow_structure(decl: ast.DataflowDecl, rep: Reporter) -> None:
    """Checks a dataflow needs no bindings for: names, keys, interfaces, arities, cycles."""
    params: dict[str, ast.Name] = {}
    for p in decl.params:
        if p.text in params:
            rep.error("E003", f"parameter `{p.text}` appears twice", p.span)
        params[p.text] = p
    if not decl.calls:
        rep.error("E032", f"dataflow `{decl.name.text}` has no calls: there is nothing to plan or run", decl.name.span,
                  "add a call such as `out = actor.generate(prompts)`, or delete the dataflow")
    model_params = {c.model.text for c in decl.calls}
    producers: dict[str, ast.CallStmt] = {}
    calls: dict[str, ast.CallStmt] = {}
    for call in decl.calls:
        if call.name.text in calls or call.name.text in params:
            rep.error("E003", f"`{call.name.text}` is defined more than once in dataflow `{decl.name.text}`",
                      call.name.span, "each call needs its own name (pins refer to it)")
        calls.setdefault(call.name.text, call)
        if call.model.text not in params:
            rep.error("E002", f"undefined model `{call.model.text}`", call.model.span,
                      f"models reach a dataflow as parameters: add `{call.model.text}` to "
                      f"`dataflow {decl.name.text}(...)`")
        if call.kind.text not in CALL_KINDS:
            rep.error("E012", f"unknown call kind `{call.kind.text}`", call.kind.span,
                      suggest(call.kind.text, CALL_KINDS) or "calls are generate, inference or train")
        for out in call.outputs:
            if out.text in params:
                rep.error("E005", f"`{out.text}` is a parameter of `{decl.name.text}` and cannot be produced",
                          out.span)
            elif out.text in producers:
                rep.error("E005", f"key `{out.text}` is produced twice (also by `{producers[out.text].name.text}`)",
                          out.span, "give one of the outputs another name")
            else:
                producers[out.text] = call
        _check_interface_arity(call, rep)
        _check_call_options(call, rep)
        by_key(call.options, rep, f"call `{call.name.text}`")
    for call in decl.calls:
        for key in call.inputs:
            if key.text in model_params:
                rep.error("E023", f"`{key.text}` is a model, not a data key", key.span,
                          "calls consume data keys: a dataset parameter or another call's output")
            elif key.text not in producers and key.text not in params:
                rep.error("E004", f"key `{key.text}` is consumed but never produced", key.span,
                          suggest(key.text, list(producers) + [p for p in params if p not in model_params])
                          or "produce it with `-> KEY` on another call, or pass a dataset parameter")
    _check_cycles(decl, producers, rep)


def _check_call_options(call: ast.CallStmt, rep: Reporter) -> None:
    """A call's options: its own counts (`CALL_KEYS`), or a setting its interface reads,
    checked against the contract like the same key in the `run` block."""
    val = Values(rep)
    iface = INTERFACES.get(_call_interface(call) or "")
    settings = {s.name: s for s in (iface.all_settings() if iface is not None else MODEL_SETTINGS)}
    for opt in call.options or ():
        if opt.key.text in CALL_KEYS:
            val.positive_int(opt)
        elif opt.key.text in settings:
            check_value(settings[opt.key.text], opt, rep)
        elif opt.key.text in ("n_mbs", "token_budget"):  # the plan's decision, not a call's option
            rep.error("E022", f"`{opt.key.text}` is not an option of call `{call.name.text}`: its micro-batches follow "
                      "from the token budget the planner chooses", opt.key.span,
                      f"pin it instead: place {call.name.text} on MESH dp = N tp = N pp = N {opt.key.text} = N")
        else:
            val.unknown(opt.key, CALL_KEYS + tuple(settings), f"the options of call `{call.name.text}`")


def _check_interface_arity(call: ast.CallStmt, rep: Reporter) -> None:
    name = _call_interface(call)
    if call.kind.text == "train" and name is None:
        rep.error("E024", f"train call `{call.name.text}` needs `using INTERFACE`", call.kind.span,
                  "train interfaces: " + ", ".join(n for n, i in INTERFACES.items() if i.kind is ir.CallKind.TRAIN))
        return
    if name is not None and name not in INTERFACES:
        rep.error("E008", f"unknown interface `{name}`", call.interface.span,
                  suggest(name, INTERFACES) or "see `rlhfc_runtime.contract.interfaces.INTERFACES`")
        return
    if call.kind.text not in CALL_KINDS:
        return
    iface = INTERFACES.get(name) if name else None
    if iface is not None and iface.kind.value != call.kind.text:
        rep.error("E012", f"interface `{name}` is for {iface.kind.value} calls, not {call.kind.text}",
                  call.interface.span if call.interface else call.kind.span)
        return
    want_in, want_out = (iface.inputs, iface.outputs) if iface else (("seq",), ("logp",))
    for got, want, word in ((call.inputs, want_in, "inputs"), (call.outputs, want_out, "outputs")):
        # more inputs than `seq` may be scores a python reward combines: checked once bound
        combines = iface is None and word == "inputs" and len(got) > len(want)
        if len(got) != len(want) and not combines:
            iname = name or "the default inference interface"
            rep.error("E010", f"`{call.name.text}` has {len(got)} {word} but {iname} takes {len(want)}",
                      call.span, f"{word}: {', '.join(want) or '(none)'}")


def _check_cycles(decl: ast.DataflowDecl, producers: dict[str, ast.CallStmt], rep: Reporter) -> None:
    """A data-key cycle would deadlock one iteration; report each one once (depth-first search)."""
    index = {id(c): i for i, c in enumerate(decl.calls)}
    succ = [sorted({index[id(producers[k.text])] for k in c.inputs if k.text in producers}) for c in decl.calls]
    state = [0] * len(decl.calls)  # 0 new, 1 on the current path, 2 finished
    for root in range(len(decl.calls)):
        if state[root]:
            continue
        state[root], stack, path = 1, [(root, iter(succ[root]))], [root]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state[nxt] == 1:
                cycle = path[path.index(nxt):] + [nxt]
                rep.error("E006", "cycle within one iteration: " + " <- ".join(decl.calls[i].name.text for i in cycle),
                          decl.calls[cycle[0]].span, "a call cannot depend on its own outputs in one iteration")
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))
                path.append(nxt)
