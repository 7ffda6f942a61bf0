"""Declarations: `cluster`, `model` (shape from a checkpoint directory or hub id, a preset or
inline keys; `hf(...)`, or `llama(...)`, its older spelling) and `dataset`."""

from __future__ import annotations

import json

from rlhfc.files import FileProblem, read_text

from rlhfc_runtime.contract.interfaces import RULES

from rlhfc import ir
from rlhfc.hardware import out_of_range
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import (
    CLUSTER_COUNTS,
    CLUSTER_OVERRIDES,
    DECODERS,
    DEFAULT_OPTIMIZER,
    OPTIMIZERS,
    Reporter,
    Unit,
    Values,
    by_key,
    device_names,
    resolved_path,
    suggest,
    value_text,
)
from rlhfc.frontend.check.rewards import check_python_model
from rlhfc.frontend.presets import PRESETS, SHAPE_KEYS
from rlhfc_runtime.contract import hub
from rlhfc_runtime.contract.family import FAMILIES, shape_from_hf

VALUE_HEAD_ARCHS = ("ForSequenceClassification", "ForTokenClassification")


def check_cluster(unit: Unit, rep: Reporter, val: Values) -> ir.Cluster:
    decls = unit.statements(ast.ClusterDecl)
    if not decls:
        return ir.Cluster(1, 1, "cpu")
    opts = by_key(decls[0].options, rep, "`cluster`")
    counts = {"nodes": 1, "devices_per_node": 1}
    device, overrides = "cpu", []
    for key, opt in opts.items():
        if key in CLUSTER_COUNTS:
            counts[key] = _plausible(key, val.positive_int(opt, "E018"), opt, rep) or 1
        elif key == "device":
            name = val.string(opt)
            if name is not None and name not in device_names():
                rep.error("E019", f"unknown device `{name}`", opt.value.span,
                          suggest(name, device_names()) or f"known devices: {', '.join(device_names())}")
            device = name or device
        elif key == "hardware":
            profiled = _hardware_profile(unit, opt, rep, val)
            if profiled:
                device, overrides = profiled[0], [*profiled[1], *overrides]
        elif key in CLUSTER_OVERRIDES:
            number = _plausible(key, val.positive_number(opt, "E018"), opt, rep)
            if number is not None:
                overrides.append((key, float(number)))
        else:
            val.unknown(opt.key, CLUSTER_COUNTS + ("device", "hardware") + CLUSTER_OVERRIDES, "`cluster`")
    figures = dict(overrides)  # the block's own figures win over a profile's (listed first)
    return ir.Cluster(counts["nodes"], counts["devices_per_node"], device, tuple(sorted(figures.items())))


def _plausible(key: str, number, opt: ast.Option, rep: Reporter):
    """`number` if it is a plausible cluster figure (`hardware.LIMITS`), else None and E018."""
    why = None if number is None else out_of_range(key, number)
    if why:
        rep.error("E018", f"{why}: not a cluster this compiler can plan", opt.value.span)
        return None
    return number


def _hardware_profile(unit: Unit, opt: ast.Option, rep: Reporter, val: Values):
    """`hardware = "hw.json"`: (device, figures) of a profile from `rlhfc profile`, relative to the program."""
    from rlhfc.hardware import ProfileError, load_profile

    text = val.string(opt)
    if text is None:
        return None
    try:
        return load_profile(unit.path.parent / text)
    except ProfileError as e:
        rep.error("E020", str(e), opt.value.span, "write one with `rlhfc profile --out FILE`")
        return None


def split_args(args, rep: Reporter, where: str):
    """(positional args, keyword options by key) of a constructor call."""
    positional = [a for a in args if a.key is None]
    keywords = by_key([ast.Option(a.key, a.value, a.span) for a in args if a.key is not None], rep, where)
    return positional, keywords


def _shape(decl: ast.ModelDecl, unit: Unit, positional, keywords, rep: Reporter,
           val: Values) -> tuple[ir.ModelShape | None, str | None, dict | None]:
    """The model's shape, checkpoint (a resolved directory, or a hub id `hf://…`) and its
    config.json, from exactly one of: checkpoint, preset, inline keys."""
    inline = {k: o for k, o in keywords.items() if k in SHAPE_KEYS}
    sources = [s for s, present in (("a checkpoint", bool(positional)), ("`preset`", "preset" in keywords),
                                     ("inline shape keys", bool(inline))) if present]
    family = decl.family.text
    if len(sources) != 1:
        message = (f"model `{decl.name.text}` has no shape" if not sources
                   else f"model `{decl.name.text}` has {' and '.join(sources)}; give exactly one")
        rep.error("E024" if not sources else "E022", message, decl.family.span,
                  f'{family}("ckpt/dir" or "owner/name"), {family}(preset = "llama-2-7b") '
                  f'or {family}(layers = 2, hidden = 64, ...)')
        return None, None, None
    if positional:
        if len(positional) > 1:
            rep.error("E022", f"`{family}` takes one positional argument, the checkpoint directory or hub id",
                      positional[1].span)
        return _checkpoint(unit, positional[0], rep, val)
    if "preset" in keywords:
        name = val.string(keywords["preset"])
        if name is not None and name not in PRESETS:
            rep.error("E025", f"unknown preset `{name}`", keywords["preset"].value.span,
                      suggest(name, PRESETS) or f"presets: {', '.join(PRESETS)}")
            return None, None, None
        return (PRESETS[name] if name else None), None, None
    values = {SHAPE_KEYS[k]: val.positive_int(o) for k, o in inline.items()}
    missing = [k for k in ("layers", "hidden", "heads", "intermediate", "vocab") if k not in inline]
    if missing:
        rep.error("E024", f"inline shape of `{decl.name.text}` lacks {', '.join(missing)}", decl.family.span,
                  "inline shapes need layers, hidden, heads, intermediate, vocab (kv_heads, max_positions optional)")
        return None, None, None
    if None in values.values():
        return None, None, None
    values.setdefault("n_kv_heads", values["n_heads"])
    shape = ir.ModelShape(**values)
    if shape.hidden % shape.n_heads or shape.n_heads % shape.n_kv_heads:
        rep.error("E022", f"inconsistent shape: hidden {shape.hidden}, heads {shape.n_heads}, "
                          f"kv_heads {shape.n_kv_heads}", decl.family.span,
                  "hidden must be a multiple of heads, heads a multiple of kv_heads")
        return None, None, None
    return shape, None, None


def _checkpoint(unit: Unit, arg: ast.Arg, rep: Reporter,
                val: Values) -> tuple[ir.ModelShape | None, str | None, dict | None]:
    """Shape, checkpoint and config.json of a positional checkpoint: a directory relative
    to the program, or a hub id whose config.json is resolved (`contract.hub`)."""
    text = val.string(arg)
    if text is None:
        return None, None, None
    try:
        ref = hub.hub_id(text, unit.path.parent)
        ckpt = None if ref is None else hub.resolve(ref)
    except hub.HubError as error:
        rep.error("E017", error.args[0], arg.span, error.hint)
        return None, None, None
    if ref is not None:
        checkpoint = str(ref)
    else:
        ckpt = resolved_path(unit.path.parent / text)
        checkpoint = str(ckpt)
    config = ckpt / "config.json"
    try:
        if not config.exists():
            raise OSError
        cfg = json.loads(read_text(config, 1 << 20, "config"))
        return shape_from_hf(cfg), checkpoint, cfg
    except OSError:
        problem = f"no `config.json` in checkpoint directory `{text}`"
    except FileProblem as error:
        problem = str(error)
    except ValueError as error:  # the runtime's own reader refuses it (json errors are ValueErrors)
        problem = f"`{text}/config.json` is not a model this runtime runs exactly: {error}"
    rep.error("E017", problem, arg.span,
              "paths are relative to the program file; or use preset = \"…\" / inline shape keys")
    return None, checkpoint, None


def check_model(decl: ast.ModelDecl, unit: Unit, rep: Reporter, val: Values) -> ir.Model:
    where = f"model `{decl.name.text}`"
    positional, keywords = split_args(decl.args, rep, where)
    family = decl.family.text
    trainable = any(isinstance(item, ast.Flag) for item in decl.body or ())
    body = by_key([i for i in decl.body or () if isinstance(i, ast.Option)], rep, where)
    if family == ir.ModelKind.RULE:
        name = val.string(positional[0]) if len(positional) == 1 and not keywords else None
        if len(positional) != 1 or keywords:
            rep.error("E022", 'a rule model takes one argument, the rule name: rule("pattern_reward")',
                      decl.family.span)
        elif name is not None and name not in RULES:
            rep.error("E009", f"unknown rule `{name}`", positional[0].span,
                      suggest(name, RULES) or f"registered rules: {', '.join(RULES)}")
        if decl.body:
            rep.error("E022", "a rule model has no parameters: no `trainable`, no optimizer", decl.body[0].span)
        return ir.Model(decl.name.text, ir.ModelKind.RULE.value, None, ir.Head.VALUE, False, None, None, name, decl.name.span)
    if family == "python":  # user reward functions: a rule-kind model
        return check_python_model(decl, unit, positional, keywords, rep, val)
    if family not in DECODERS:
        rep.error("E022", f"unknown model family `{family}`", decl.family.span,
                  "families: hf(...) for a decoder (llama(...) is its older spelling), rule(\"NAME\") or "
                  "python(\"FILE:FN\") for a reward")
        return ir.Model(decl.name.text, family, None, ir.Head.LM, trainable, None, None, None, decl.name.span)
    head = ir.Head.LM
    for key, opt in keywords.items():
        if key == "head":
            if isinstance(opt.value, ast.Name) and opt.value.text in ("lm", "value"):
                head = ir.Head(opt.value.text)
            else:
                rep.error("E022", f"`head` is `lm` or `value`, not `{value_text(opt.value)}`", opt.value.span)
        elif key != "preset" and key not in SHAPE_KEYS:
            val.unknown(opt.key, ("head", "preset") + tuple(SHAPE_KEYS), f"`{family}(...)`")
    shape, checkpoint, config = _shape(decl, unit, positional, keywords, rep, val)
    if config is not None and shape is not None and "head" not in keywords:
        _value_head_checkpoint(decl, config, positional[0].span, rep)
    if head is ir.Head.VALUE and shape is not None and not FAMILIES[shape.family].value_head:
        rep.error("E017", f"`{decl.name.text}`: a {shape.family} model has no value head here: transformers has no "
                          f"{FAMILIES[shape.family].arch}ForTokenClassification to export it as",
                  keywords["head"].value.span, "use a family with one (Llama, Qwen2/3, Mistral, Gemma 2, Phi-3, SmolLM3) "
                                               "for critics and reward models")
    optimizer = DEFAULT_OPTIMIZER if trainable else None
    for key, opt in body.items():
        if key != "optimizer":
            val.unknown(opt.key, ("optimizer",), f"the body of {where}")
        elif not isinstance(opt.value, ast.Func) or opt.value.name.text not in OPTIMIZERS:
            rep.error("E022", f"`optimizer` must be one of {', '.join(o + '(...)' for o in OPTIMIZERS)}",
                      opt.value.span, "e.g. optimizer = adam(lr = 1e-6, weight_decay = 0.0)")
        elif not trainable:
            rep.error("E022", f"optimizer on frozen model `{decl.name.text}`", opt.span,
                      "add `trainable` to the model's body, or drop the optimizer")
        else:
            params, seen = [], set()
            for kw in opt.value.kwargs:
                key = kw.key.text
                if key not in OPTIMIZER_BOUNDS:
                    val.unknown(kw.key, tuple(OPTIMIZER_BOUNDS), f"`{opt.value.name.text}(...)`")
                elif key in seen or seen.add(key):
                    rep.error("E003", f"optimizer setting `{key}` is given more than once", kw.key.span)
                elif not isinstance(kw.value, ast.Number):
                    rep.error("E022", f"optimizer setting `{key}` must be a number", kw.value.span)
                elif not OPTIMIZER_BOUNDS[key][0](float(kw.value.value)):
                    rep.error("E022", f"optimizer setting `{key} = {kw.value.value}`: {OPTIMIZER_BOUNDS[key][1]}",
                              kw.value.span)
                else:
                    params.append((key, float(kw.value.value)))
            optimizer = ir.Optimizer(opt.value.name.text, tuple(params))
    return ir.Model(decl.name.text, ir.ModelKind.LLAMA.value, shape, head, trainable, checkpoint, optimizer, None, decl.name.span)


OPTIMIZER_BOUNDS = {  # what torch's Adam / AdamW accept as numbers
    "lr": (lambda v: 0 < v < 1e3, "the learning rate must be positive"),
    "weight_decay": (lambda v: 0 <= v < 1e3, "weight decay must be 0 or more"),
    "eps": (lambda v: 0 < v < 1, "eps must be positive and small"),
}


def _value_head_checkpoint(decl: ast.ModelDecl, config: dict, span, rep: Reporter) -> None:
    """A checkpoint of a scoring architecture loaded as an LM: its value head would be dropped."""
    archs = (config.get("architectures") if isinstance(config, dict) else None) or []
    if not isinstance(archs, list):
        return
    scoring = [a for a in archs if isinstance(a, str) and a.endswith(VALUE_HEAD_ARCHS)]
    if scoring:
        rep.error("E011", f"`{decl.name.text}` loads a `{scoring[0]}` checkpoint (a value head) as a language model",
                  span, "add `head = value` to use its score head")
