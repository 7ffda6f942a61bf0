"""`model r = python(...)`: reward functions written in Python, checked without running them.

Two forms, both naming functions of the form `f(prompts, completions, **columns) -> list[float]`
(TRL's reward signature):

    model reward = python("rewards.py:exact_match")
    model reward = python("rewards.py", exact_match = 1.0, format_ok = 0.2)   // weighted sum

Paths are relative to the program. The checker reads the file with `ast` (it never imports
or runs it): the file must parse and define each function at top level; the runtime imports
it in the workers only.

A weighted name the file does not define is a *score key*: a data key the reward's inference
call takes after `seq`, such as a reward model's output, added to the sum with its weight
(TRL's `reward_funcs` mixing models and functions, as dataflow keys):

    judge = rm.inference(seq)                 -> rm_score
    score = reward.inference(seq, rm_score)   -> score      // python("rewards.py", f = 1.0, rm_score = 0.5)
"""

from __future__ import annotations

import ast as pyast

from rlhfc import ir
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import Reporter, Unit, Values, display, resolved_path, suggest

MAX_SOURCE_BYTES = 4 * 2**20
FORMS = 'python("rewards.py:fn") or python("rewards.py", fn = 1.0, other = 0.2)'


def check_python_model(decl: ast.ModelDecl, unit: Unit, positional, keywords, rep: Reporter,
                       val: Values) -> ir.Model:
    """A reward model of Python functions, (file, function, weight) per component, and
    score keys (key, weight): the weighted names the file does not define, checked
    against the calls by `check_score_keys`."""
    name = decl.name.text
    functions: list[tuple[str, str, float]] = []
    score_keys: list[tuple[str, float]] = []
    if decl.body:
        rep.error("E022", "a python reward has no parameters: no `trainable`, no optimizer", decl.body[0].span)
    text = val.string(positional[0]) if len(positional) == 1 else None
    if len(positional) != 1:
        rep.error("E022" if positional else "E024", f"`python(...)` takes one file argument: {FORMS}",
                  decl.family.span)
    elif text is not None:
        path_text, _, function = text.rpartition(":") if ":" in text else (text, "", "")
        if function and keywords:
            rep.error("E022", "name the functions either after the `:` or as weighted keys, not both",
                      positional[0].span, FORMS)
        elif not function and not keywords:
            rep.error("E024", f"`{text}` names no function", positional[0].span,
                      f'add one after a colon, "{text}:exact_match", or weighted keys: {FORMS}')
        weights = [(function, 1.0, positional[0].span)] if function else []
        for key, opt in keywords.items():
            weight = _number(opt, rep)
            if weight is not None:
                weights.append((key, float(weight), opt.key.span))
        path = resolved_path(unit.path.parent / path_text)
        defined = _functions_in(path, path_text, positional[0].span, rep)
        for fn, weight, span in weights:
            if defined is not None and fn not in defined and not function:  # weighted, not a function: a score key
                score_keys.append((fn, weight))
                continue
            if defined is not None and fn not in defined:
                rep.error("E029", f"`{path_text}` defines no function `{fn}`", span,
                          suggest(fn, defined) or (f"functions in it: {', '.join(sorted(defined))}" if defined
                                                   else "define it at the top level of the file"))
            functions.append((str(path), fn, weight))
    return ir.Model(name, ir.ModelKind.RULE.value, None, ir.Head.VALUE, False, None, None, None, decl.name.span,
                    tuple(functions), tuple(score_keys))


def check_reward_inputs(call: ast.CallStmt, model: ir.Model, params, rep: Reporter) -> None:
    """The inputs of an inference call on a reward without parameters: `seq`, then (python
    rewards only) score keys its `python(...)` weighs, each a key another call produces.
    The call stays bound either way, so `check_score_keys` sees what it passes."""
    extra = call.inputs[1:]
    if extra and model.rule is not None:
        rep.error("E010", f"`{call.name.text}` has {len(call.inputs)} inputs but rule `{model.rule}` takes 1",
                  extra[0].span, "only a python(...) reward combines other scores: inputs: seq")
        return
    functions = {fn for _, fn, _ in model.functions}
    for key in extra:
        if key.text in params:
            rep.error("E023", f"`{key.text}` is a parameter of the dataflow, not a score to combine", key.span,
                      "pass keys produced by other calls, e.g. a reward model's `-> rm_score`")
        elif key.text in functions:
            rep.error("E022", f"key `{key.text}` has the name of a function `{model.name}` calls", key.span,
                      "rename the key: a weighted name is a function of the file, or else a score key")
        elif key.text not in dict(model.score_keys):
            rep.error("E022", f"`{model.name}` gives no weight to key `{key.text}`", key.span,
                      f"add `{key.text} = 1.0` to `python(...)` in `model {model.name}`")


def check_score_keys(unit: Unit, models: dict[str, ir.Model], calls: tuple[ir.Call, ...], rep: Reporter) -> None:
    """E029 at every weighted name that is neither a function of the file nor an input of
    each of the model's calls in the run."""
    for model in models.values():
        mine = [c for c in calls if c.model == model.name]
        decl = unit.models[model.name]
        for key, _ in model.score_keys:
            lacking = [c.name for c in mine if key not in c.inputs[1:]]
            if mine and not lacking:
                continue
            span = next(a.key.span for a in decl.args if a.key is not None and a.key.text == key)
            path = next(a.value.value for a in decl.args if a.key is None)  # it parsed: score keys need it
            defined = _functions_in(resolved_path(unit.path.parent / path), path, span, rep) or set()
            defined |= {k for c in mine for k in c.inputs[1:]}  # or a key the calls pass
            passes = f"call `{lacking[0]}` does not pass a key `{key}`" if lacking else f"no call passes a key `{key}`"
            rep.error("E029", f"`{path}` defines no function `{key}`, and {passes} to `{model.name}`", span,
                      suggest(key, defined) or f"define `{key}` in `{path}`, or pass the score to the reward's call: "
                                               f"`score = {model.name}.inference(seq, {key}) -> score`")


def _number(opt: ast.Option, rep: Reporter) -> float | None:
    if isinstance(opt.value, ast.Number):
        return opt.value.value
    rep.error("E022", f"the weight of `{opt.key.text}` must be a number", opt.value.span,
              "e.g. exact_match = 1.0, format_ok = 0.2")
    return None


def _functions_in(path, path_text: str, span: ir.Span, rep: Reporter) -> set[str] | None:
    """Names of the top-level functions of a Python file (None, reported, if unreadable)."""
    try:
        if path.stat().st_size > MAX_SOURCE_BYTES:
            raise ValueError(f"larger than {MAX_SOURCE_BYTES // 2**20} MiB")
        source = path.read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        problem = "not found" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        rep.error("E020", f"reward file `{path_text}` {problem}", span,
                  "paths are relative to the program file")
        return None
    try:
        tree = pyast.parse(source, filename=str(path))
    except SyntaxError as e:
        rep.error("E029", f"`{display(path)}:{e.lineno}:{e.offset}`: Python syntax error: {e.msg}", span,
                  "fix the reward file; the checker reads it but never runs it")
        return None
    return {n.name for n in tree.body if isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef))}
