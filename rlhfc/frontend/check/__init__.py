"""AST → IR: name resolution, imports, instantiation of the `run` dataflow, validation.

`load_program` is the front end's one entry point. It reports every error it can find
in one pass (rustc-style diagnostics with codes, see `rlhfc.diagnostics.CODES`) and
only returns a `Dataflow` when there are none.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rlhfc import ir

from rlhfc.frontend import ast
from rlhfc.diagnostics import CompileError, Diagnostic, Severity
from rlhfc_runtime.contract.interfaces import INTERFACES, RULES, default_interface
from rlhfc.hardware import OVERRIDE_KEYS
from rlhfc.frontend.parse import parse_file
from rlhfc.frontend.presets import PRESETS, SHAPE_KEYS, shape_from_config

# The device names a `cluster` may use, when the planner's hardware catalog is absent.
FALLBACK_DEVICE_NAMES: tuple[str, ...] = ("H100-80GB", "H200", "A100-80GB", "A100-40GB", "cpu")


def device_names() -> tuple[str, ...]:
    """Catalog names accepted by `cluster { device = … }`: the hardware catalog's, one source of truth."""
    try:
        from rlhfc.hardware import DEVICE_NAMES
    except ImportError:
        return FALLBACK_DEVICE_NAMES
    return DEVICE_NAMES


CALL_KINDS = tuple(k.value for k in ir.CallKind)
CALL_OPTIONS = ("n_mbs", "max_new_tokens", "group_size", "temperature", "top_p", "top_k")
INT_CALL_OPTIONS = ("n_mbs", "max_new_tokens", "group_size", "top_k")
CLUSTER_COUNTS = ("nodes", "devices_per_node")
CLUSTER_OVERRIDES = OVERRIDE_KEYS  # device figures a `cluster` block may set: the catalog's own list
DATASET_FIELDS = ("field", "prompt", "chosen", "rejected", "response")
OPTIMIZERS = ("adam", "adamw")
DEFAULT_OPTIMIZER = ir.Optimizer("adam", (("lr", 1e-5),))
STDLIB_PREFIX = "stdlib/"


def _display(path: Path) -> str:
    """How a file is named in diagnostics: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _exists(path: Path) -> bool:
    """`path.exists()` that treats unusable names (too long, NUL bytes) as absent."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, ValueError):
        return path


def _suggest(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean `{close[0]}`?" if close else None


class _Reporter:
    """Collects diagnostics and the source lines they point at."""

    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []
        self.texts: dict[str, list[str]] = {}

    def add(self, severity: Severity, code: str, message: str, span: ir.Span | None, hint: str | None):
        lines = self.texts.get(span.file, []) if span else []
        line_text = lines[span.line - 1] if span and 0 < span.line <= len(lines) else None
        self.diagnostics.append(Diagnostic(severity, code, message, span, hint, line_text))

    def error(self, code: str, message: str, span: ir.Span | None, hint: str | None = None) -> None:
        self.add(Severity.ERROR, code, message, span, hint)

    def warning(self, code: str, message: str, span: ir.Span | None, hint: str | None = None) -> None:
        self.add(Severity.WARNING, code, message, span, hint)

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self.diagnostics)


@dataclass
class _Unit:
    """One parsed file and its top-level names."""

    path: Path
    display: str
    program: ast.Program
    dataflows: dict[str, tuple[_Unit, ast.DataflowDecl]] = field(default_factory=dict)
    models: dict[str, ast.ModelDecl] = field(default_factory=dict)
    datasets: dict[str, ast.DatasetDecl] = field(default_factory=dict)

    def statements(self, kind):
        return [s for s in self.program.statements if isinstance(s, kind)]


# ---------------------------------------------------------------------------- loading


def _resolve_import(unit: _Unit, literal: str) -> tuple[Path, str]:
    """(real path, display name) of an import: `stdlib/X` is the shipped library."""
    if literal.startswith(STDLIB_PREFIX):
        path = Path(str(resources.files("rlhfc_stdlib").joinpath(literal[len(STDLIB_PREFIX):])))
        return path, _display(path)
    path = unit.path.parent / literal
    return path, os.path.normpath(os.path.join(os.path.dirname(unit.display), literal))


class _Loader:
    """Parses a program and, transitively, the files it imports; detects import cycles."""

    def __init__(self, rep: _Reporter) -> None:
        self.rep = rep
        self.units: dict[Path, _Unit] = {}
        self.in_progress: list[Path] = []

    def load(self, path: Path, display: str, origin: ir.Span | None) -> _Unit | None:
        key = _resolved(path) if _exists(path) else path
        if key in self.in_progress:
            chain = " -> ".join(self.units[p].display for p in self.in_progress[self.in_progress.index(key):])
            self.rep.error("E021", f"import cycle: {chain} -> {display}", origin,
                           "move the shared dataflows into a third file that both import")
            return None
        if key in self.units:
            return self.units[key]
        try:
            text, program = parse_file(path, display)
        except CompileError as error:
            if origin is not None and error.diagnostics[0].code == "E020":
                self.rep.error("E020", error.diagnostics[0].message, origin,
                               "paths are relative to the importing file; `stdlib/NAME.rlhf` is the shipped library")
            else:
                self.rep.diagnostics.extend(error.diagnostics)
            return None
        self.rep.texts[display] = text.split("\n")  # lines as the lexer counts them
        unit = _Unit(path, display, program)
        self.units[key] = unit
        self.in_progress.append(key)
        self._collect(unit)
        self.in_progress.pop()
        return unit

    def _define(self, unit: _Unit, table: dict, name: ast.Name, value) -> None:
        seen = {**unit.dataflows, **unit.models, **unit.datasets}
        if name.text in seen:
            self.rep.error("E003", f"`{name.text}` is defined more than once", name.span,
                           "models, datasets and dataflows share one namespace per file")
        else:
            table[name.text] = value

    def _collect(self, unit: _Unit) -> None:
        for stmt in unit.program.statements:
            if isinstance(stmt, ast.Import):
                path, display = _resolve_import(unit, stmt.path.value)
                target = self.load(path, display, stmt.path.span)
                for name in stmt.names:
                    if target is None:
                        continue
                    if name.text not in target.dataflows:
                        self.rep.error("E002", f"`{display}` defines no dataflow `{name.text}`", name.span,
                                       _suggest(name.text, target.dataflows) or "only dataflows can be imported")
                    else:
                        self._define(unit, unit.dataflows, name, target.dataflows[name.text])
            elif isinstance(stmt, ast.DataflowDecl):
                self._define(unit, unit.dataflows, stmt.name, (unit, stmt))
            elif isinstance(stmt, ast.ModelDecl):
                self._define(unit, unit.models, stmt.name, stmt)
            elif isinstance(stmt, ast.DatasetDecl):
                self._define(unit, unit.datasets, stmt.name, stmt)
        for kind, word in ((ast.ClusterDecl, "cluster"), (ast.RunStmt, "run")):
            for extra in unit.statements(kind)[1:]:
                self.rep.error("E003", f"more than one `{word}` statement", extra.span,
                               f"a program has at most one `{word}`")


# ---------------------------------------------------------------------------- values


def _plain(value: ast.Value):
    """A literal's Python value; names become their text; functions are not plain."""
    if isinstance(value, (ast.Number, ast.String, ast.Bool)):
        return value.value
    if isinstance(value, ast.Name):
        return value.text
    return None


def _describe(value: ast.Value) -> str:
    return {ast.Number: "a number", ast.String: "a string", ast.Bool: "a boolean",
            ast.Name: "a name", ast.Func: "a function"}[type(value)]


class _Values:
    """Typed reads of option values that report E022 instead of failing."""

    def __init__(self, rep: _Reporter) -> None:
        self.rep = rep

    def positive_int(self, opt: ast.Option | ast.Arg, code: str = "E022") -> int | None:
        v = opt.value
        if isinstance(v, ast.Number) and isinstance(v.value, int) and v.value >= 1:
            return v.value
        self.rep.error(code, f"`{opt.key.text}` must be a positive integer, not {_describe(v)} `{_text(v)}`",
                       v.span)
        return None

    def natural(self, opt: ast.Option) -> int | None:
        """A non-negative integer (seeds)."""
        if isinstance(opt.value, ast.Number) and isinstance(opt.value.value, int) and opt.value.value >= 0:
            return opt.value.value
        self.rep.error("E022", f"`{opt.key.text}` must be an integer >= 0, not `{_text(opt.value)}`", opt.value.span)
        return None

    def positive_number(self, opt: ast.Option, code: str = "E022") -> float | int | None:
        v = opt.value
        if isinstance(v, ast.Number) and 0 < v.value < float("inf"):
            return v.value
        self.rep.error(code, f"`{opt.key.text}` must be a positive number, not {_describe(v)} `{_text(v)}`",
                       v.span)
        return None

    def string(self, opt: ast.Option | ast.Arg) -> str | None:
        if isinstance(opt.value, ast.String):
            return opt.value.value
        key = opt.key.text if opt.key else "argument"
        self.rep.error("E022", f"`{key}` must be a string, not {_describe(opt.value)}", opt.value.span,
                       'write it in double quotes: "…"')
        return None

    def plain(self, opt: ast.Option):
        if isinstance(opt.value, ast.Func):
            self.rep.error("E022", f"`{opt.key.text}` takes a plain value, not a function", opt.value.span)
            return None
        return _plain(opt.value)

    def unknown(self, key: ast.Name, known, where: str) -> None:
        hint = _suggest(key.text, known) or f"known keys: {', '.join(known)}"
        self.rep.error("E022", f"unknown key `{key.text}` in {where}", key.span, hint)


def _text(value: ast.Value) -> str:
    if isinstance(value, ast.Number):
        return value.text
    if isinstance(value, ast.String):
        return json.dumps(value.value)
    if isinstance(value, ast.Bool):
        return "true" if value.value else "false"
    if isinstance(value, ast.Name):
        return value.text
    return f"{value.name.text}(…)"


def _options(opts, rep: _Reporter, where: str) -> dict[str, ast.Option]:
    """Options by key, reporting repeated keys (E003)."""
    table: dict[str, ast.Option] = {}
    for opt in opts or ():
        if opt.key.text in table:
            rep.error("E003", f"`{opt.key.text}` is set twice in {where}", opt.key.span)
        else:
            table[opt.key.text] = opt
    return table


# ---------------------------------------------------------------------------- declarations


def _check_cluster(unit: _Unit, rep: _Reporter, val: _Values) -> ir.Cluster:
    decls = unit.statements(ast.ClusterDecl)
    if not decls:
        return ir.Cluster(1, 1, "cpu")
    opts = _options(decls[0].options, rep, "`cluster`")
    counts = {"nodes": 1, "devices_per_node": 1}
    device, overrides = "cpu", []
    for key, opt in opts.items():
        if key in CLUSTER_COUNTS:
            counts[key] = val.positive_int(opt, "E018") or 1
        elif key == "device":
            name = val.string(opt)
            if name is not None and name not in device_names():
                rep.error("E019", f"unknown device `{name}`", opt.value.span,
                          _suggest(name, device_names()) or f"known devices: {', '.join(device_names())}")
            device = name or device
        elif key == "hardware":
            profiled = _hardware_profile(unit, opt, rep, val)
            if profiled:
                device, overrides = profiled[0], [*profiled[1], *overrides]
        elif key in CLUSTER_OVERRIDES:
            number = val.positive_number(opt, "E018")
            if number is not None:
                overrides.append((key, float(number)))
        else:
            val.unknown(opt.key, CLUSTER_COUNTS + ("device", "hardware") + CLUSTER_OVERRIDES, "`cluster`")
    figures = dict(overrides)  # the block's own figures win over a profile's (listed first)
    return ir.Cluster(counts["nodes"], counts["devices_per_node"], device, tuple(sorted(figures.items())))


def _hardware_profile(unit: _Unit, opt: ast.Option, rep: _Reporter, val: _Values):
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


def _keywords(args, rep: _Reporter, where: str):
    """(positional args, keyword options by key) of a constructor call."""
    positional = [a for a in args if a.key is None]
    keywords = _options([ast.Option(a.key, a.value, a.span) for a in args if a.key is not None], rep, where)
    return positional, keywords


def _shape(decl: ast.ModelDecl, unit: _Unit, positional, keywords, rep: _Reporter,
           val: _Values) -> tuple[ir.ModelShape | None, str | None]:
    """The model's shape and resolved checkpoint from exactly one of: checkpoint, preset, inline keys."""
    inline = {k: o for k, o in keywords.items() if k in SHAPE_KEYS}
    sources = [s for s, present in (("a checkpoint", bool(positional)), ("`preset`", "preset" in keywords),
                                     ("inline shape keys", bool(inline))) if present]
    if len(sources) != 1:
        message = (f"model `{decl.name.text}` has no shape" if not sources
                   else f"model `{decl.name.text}` has {' and '.join(sources)}; give exactly one")
        rep.error("E024" if not sources else "E022", message, decl.family.span,
                  'llama("ckpt/dir"), llama(preset = "llama-2-7b") or llama(layers = 2, hidden = 64, ...)')
        return None, None
    if positional:
        if len(positional) > 1:
            rep.error("E022", "`llama` takes one positional argument, the checkpoint directory",
                      positional[1].span)
        path_text = val.string(positional[0])
        if path_text is None:
            return None, None
        ckpt = _resolved(unit.path.parent / path_text)
        config = ckpt / "config.json"
        try:
            return shape_from_config(json.loads(config.read_text(encoding="utf-8"))), str(ckpt)
        except OSError:
            problem = f"no `config.json` in checkpoint directory `{path_text}`"
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            problem = f"`{path_text}/config.json` is not a usable LLaMA config ({error})"
        rep.error("E017", problem, positional[0].span,
                  "paths are relative to the program file; or use preset = \"…\" / inline shape keys")
        return None, str(ckpt)
    if "preset" in keywords:
        name = val.string(keywords["preset"])
        if name is not None and name not in PRESETS:
            rep.error("E025", f"unknown preset `{name}`", keywords["preset"].value.span,
                      _suggest(name, PRESETS) or f"presets: {', '.join(PRESETS)}")
            return None, None
        return (PRESETS[name] if name else None), None
    values = {SHAPE_KEYS[k]: val.positive_int(o) for k, o in inline.items()}
    missing = [k for k in ("layers", "hidden", "heads", "intermediate", "vocab") if k not in inline]
    if missing:
        rep.error("E024", f"inline shape of `{decl.name.text}` lacks {', '.join(missing)}", decl.family.span,
                  "inline shapes need layers, hidden, heads, intermediate, vocab (kv_heads, max_positions optional)")
        return None, None
    if None in values.values():
        return None, None
    values.setdefault("n_kv_heads", values["n_heads"])
    shape = ir.ModelShape(**values)
    if shape.hidden % shape.n_heads or shape.n_heads % shape.n_kv_heads:
        rep.error("E022", f"inconsistent shape: hidden {shape.hidden}, heads {shape.n_heads}, "
                          f"kv_heads {shape.n_kv_heads}", decl.family.span,
                  "hidden must be a multiple of heads, heads a multiple of kv_heads")
        return None, None
    return shape, None


def _check_model(decl: ast.ModelDecl, unit: _Unit, rep: _Reporter, val: _Values) -> ir.Model:
    where = f"model `{decl.name.text}`"
    positional, keywords = _keywords(decl.args, rep, where)
    family = decl.family.text
    trainable = any(isinstance(item, ast.Flag) for item in decl.body or ())
    body = _options([i for i in decl.body or () if isinstance(i, ast.Option)], rep, where)
    if family == "rule":
        name = val.string(positional[0]) if len(positional) == 1 and not keywords else None
        if len(positional) != 1 or keywords:
            rep.error("E022", 'a rule model takes one argument, the rule name: rule("pattern_reward")',
                      decl.family.span)
        elif name is not None and name not in RULES:
            rep.error("E009", f"unknown rule `{name}`", positional[0].span,
                      _suggest(name, RULES) or f"registered rules: {', '.join(RULES)}")
        if decl.body:
            rep.error("E022", "a rule model has no parameters: no `trainable`, no optimizer", decl.body[0].span)
        return ir.Model(decl.name.text, "rule", None, ir.Head.VALUE, False, None, None, name, decl.name.span)
    if family != "llama":
        rep.error("E022", f"unknown model family `{family}`", decl.family.span,
                  "families: llama(...) for a decoder, rule(\"NAME\") for a reward function")
        return ir.Model(decl.name.text, family, None, ir.Head.LM, trainable, None, None, None, decl.name.span)
    head = ir.Head.LM
    for key, opt in keywords.items():
        if key == "head":
            if isinstance(opt.value, ast.Name) and opt.value.text in ("lm", "value"):
                head = ir.Head(opt.value.text)
            else:
                rep.error("E022", f"`head` is `lm` or `value`, not `{_text(opt.value)}`", opt.value.span)
        elif key != "preset" and key not in SHAPE_KEYS:
            val.unknown(opt.key, ("head", "preset") + tuple(SHAPE_KEYS), f"`llama(...)`")
    shape, checkpoint = _shape(decl, unit, positional, keywords, rep, val)
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
            params = []
            for kw in opt.value.kwargs:
                if isinstance(kw.value, ast.Number):
                    params.append((kw.key.text, float(kw.value.value)))
                else:
                    rep.error("E022", f"optimizer setting `{kw.key.text}` must be a number", kw.value.span)
            optimizer = ir.Optimizer(opt.value.name.text, tuple(params))
    return ir.Model(decl.name.text, "llama", shape, head, trainable, checkpoint, optimizer, None, decl.name.span)


def _check_dataset(decl: ast.DatasetDecl, unit: _Unit, rep: _Reporter, val: _Values) -> ir.Dataset:
    where = f"dataset `{decl.name.text}`"
    positional, keywords = _keywords(decl.args, rep, where)
    if decl.format.text != "jsonl":
        rep.error("E022", f"unknown dataset format `{decl.format.text}`", decl.format.span,
                  'the one format is jsonl("PATH", field = "prompt", max_len = N)')
    path_text = val.string(positional[0]) if positional else None
    if len(positional) != 1:
        rep.error("E024" if not positional else "E022", f"{where} takes one positional argument, the file path",
                  decl.format.span)
    fields, max_len, tokenizer = [], 0, None
    for key, opt in keywords.items():
        if key in DATASET_FIELDS:
            column = val.string(opt)
            if column is not None:
                fields.append((key, column))
        elif key == "max_len":
            max_len = val.positive_int(opt) or 0
        elif key == "tokenizer":
            tokenizer = val.string(opt)
        else:
            val.unknown(opt.key, DATASET_FIELDS + ("max_len", "tokenizer"), where)
    names = {k for k, _ in fields}
    if "max_len" not in keywords:
        rep.error("E024", f"{where} needs `max_len`", decl.span, "max_len = N: prompt (or pair) tokens")
    if not names & {"field", "prompt"}:
        rep.error("E024", f"{where} needs `field` or `prompt`", decl.span,
                  'field = "prompt" names the JSON key holding the text')
    if ("chosen" in names) != ("rejected" in names):
        rep.error("E024", f"{where} has only one of `chosen` / `rejected`", decl.span, "pair data needs both")
    resolved = {}
    for label, text, span in (("dataset file", path_text, positional[0].span if positional else None),
                              ("tokenizer", tokenizer, keywords["tokenizer"].value.span if tokenizer else None)):
        if text is None:
            continue
        resolved[label] = _resolved(unit.path.parent / text)
        if not _exists(resolved[label]):
            rep.warning("W001", f"{label} `{text}` not found (yet)", span,
                        "paths are relative to the program file; it must exist when the program runs")
    tok = str(resolved["tokenizer"]) if "tokenizer" in resolved else None
    return ir.Dataset(decl.name.text, decl.format.text, str(resolved.get("dataset file", "")), tuple(fields),
                      max_len, decl.name.span, tok)


# ---------------------------------------------------------------------------- dataflows


def _call_interface(call: ast.CallStmt) -> str | None:
    """The interface a call names, or the head-independent default for its kind."""
    if call.interface is not None:
        return call.interface.text
    kind = call.kind.text
    return "generate" if kind == "generate" else None


def _check_dataflow_structure(decl: ast.DataflowDecl, rep: _Reporter) -> None:
    """Checks a dataflow needs no bindings for: names, keys, interfaces, arities, cycles."""
    params: dict[str, ast.Name] = {}
    for p in decl.params:
        if p.text in params:
            rep.error("E003", f"parameter `{p.text}` appears twice", p.span)
        params[p.text] = p
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
                      _suggest(call.kind.text, CALL_KINDS) or "calls are generate, inference or train")
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
        _options(call.options, rep, f"call `{call.name.text}`")
    for call in decl.calls:
        for key in call.inputs:
            if key.text in model_params:
                rep.error("E023", f"`{key.text}` is a model, not a data key", key.span,
                          "calls consume data keys: a dataset parameter or another call's output")
            elif key.text not in producers and key.text not in params:
                rep.error("E004", f"key `{key.text}` is consumed but never produced", key.span,
                          _suggest(key.text, list(producers) + [p for p in params if p not in model_params])
                          or "produce it with `-> KEY` on another call, or pass a dataset parameter")
    _check_cycles(decl, producers, rep)


def _check_call_options(call: ast.CallStmt, rep: _Reporter) -> None:
    """Known option keys, with counts as positive integers and sampling settings as positive numbers."""
    val = _Values(rep)
    for opt in call.options or ():
        if opt.key.text not in CALL_OPTIONS:
            val.unknown(opt.key, CALL_OPTIONS, f"the options of call `{call.name.text}`")
        elif opt.key.text in INT_CALL_OPTIONS:
            val.positive_int(opt)
        else:
            val.positive_number(opt)


def _check_interface_arity(call: ast.CallStmt, rep: _Reporter) -> None:
    name = _call_interface(call)
    if call.kind.text == "train" and name is None:
        rep.error("E024", f"train call `{call.name.text}` needs `using INTERFACE`", call.kind.span,
                  "train interfaces: " + ", ".join(n for n, i in INTERFACES.items() if i.kind is ir.CallKind.TRAIN))
        return
    if name is not None and name not in INTERFACES:
        rep.error("E008", f"unknown interface `{name}`", call.interface.span,
                  _suggest(name, INTERFACES) or "see `rlhfc_runtime.contract.interfaces.INTERFACES`")
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
        if len(got) != len(want):
            iname = name or "the default inference interface"
            rep.error("E010", f"`{call.name.text}` has {len(got)} {word} but {iname} takes {len(want)}",
                      call.span, f"{word}: {', '.join(want) or '(none)'}")


def _check_cycles(decl: ast.DataflowDecl, producers: dict[str, ast.CallStmt], rep: _Reporter) -> None:
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


# ---------------------------------------------------------------------------- instantiation


@dataclass(frozen=True)
class _KeyInfo:
    """Sequences per iteration and token lengths carried by one data key."""

    rows: int
    prompt_len: int
    gen_len: int


def _run_config(run: ast.RunStmt, rep: _Reporter, val: _Values) -> ir.RunConfig:
    opts = _options(run.options, rep, "`run`")
    batch, steps = 1, 1
    if "batch" not in opts:
        rep.error("E024", "`run` needs `batch` (prompts per iteration)", run.span, "run NAME(...) { batch = 64 }")
    params = []
    for key, opt in opts.items():
        if key in ("batch", "steps", "max_new_tokens", "group_size", "seed", "save_every"):
            number = val.positive_int(opt) if key != "seed" else val.natural(opt)
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


def _instantiate(unit: _Unit, run: ast.RunStmt, models: dict[str, ir.Model], datasets: dict[str, ir.Dataset],
                 config: ir.RunConfig, rep: _Reporter
                 ) -> tuple[tuple[ir.Call, ...], tuple[ir.Edge, ...], set[str]]:
    """The run's dataflow bound to this program's models and datasets: (calls, edges, all call names).

    Calls whose binding failed are left out of `calls` but kept in the names, so that
    pins on them are still checked.
    """
    if run.dataflow.text not in unit.dataflows:
        rep.error("E002", f"undefined dataflow `{run.dataflow.text}`", run.dataflow.span,
                  _suggest(run.dataflow.text, unit.dataflows) or 'import it: import ppo from "stdlib/ppo.rlhf"')
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
                      _suggest(arg.text, list(models) + list(datasets)) or "declare it with `model` or `dataset`")
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
    calls = _sized(tuple(calls), datasets, binding, config)
    too_long = set()  # one error per model: its first call that does not fit
    for call in calls:
        shape = models[call.model].shape
        if shape is not None and call.seq_len > shape.max_positions and call.model not in too_long:
            too_long.add(call.model)
            rep.error("E026", f"call `{call.name}` needs {call.prompt_len} prompt + {call.gen_len} generated = "
                              f"{call.seq_len} positions, but `{call.model}` has max_positions {shape.max_positions}",
                      run.span, "lower the dataset's max_len or max_new_tokens, or use a longer-context model")
    return calls, _edges(calls, models), names


def _bind_call(call: ast.CallStmt, model: ir.Model, binding: dict[str, str], config: ir.RunConfig,
               arg_span: ir.Span, rep: _Reporter) -> ir.Call | None:
    """One call bound to a model: interface, head, trainability; sizes come later."""
    kind = ir.CallKind(call.kind.text)
    where = f"call `{call.name.text}` ({call.model.text} = `{model.name}`)"
    if model.kind == "rule":
        if kind is not ir.CallKind.INFERENCE or call.interface is not None:
            rep.error("E012", f"{where}: a rule model only supports `inference` with its own rule", arg_span,
                      f"`{model.name}` is rule(\"{model.rule}\"); bind a llama model here instead")
            return None
        interface = "rule"
    else:
        interface = call.interface.text if call.interface else default_interface(kind, model.head, False)
        iface = INTERFACES.get(interface or "")
        if iface is None:
            return None  # reported by the structural check
        if iface.head is not None and iface.head is not model.head:
            rep.error("E011", f"{where}: interface `{interface}` needs a `head = {iface.head.value}` model, "
                              f"`{model.name}` has `head = {model.head.value}`", arg_span,
                      f"bind a {iface.head.value}-head model, or set `head = {iface.head.value}` on `{model.name}`")
            return None
    if kind is ir.CallKind.TRAIN and not model.trainable:
        rep.error("E007", f"{where} trains model `{model.name}`, which is frozen", arg_span,
                  f"add `{{ trainable  optimizer = adam(lr = 1e-6) }}` to `model {model.name}`")
        return None
    options = tuple((o.key.text, _plain(o.value)) for o in call.options or () if _plain(o.value) is not None)
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
           config: ir.RunConfig) -> tuple[ir.Call, ...]:
    """Batch, prompt and generation lengths of every call, propagated along data keys.

    A dataset key carries `batch` rows (2 × batch sequences for chosen/rejected pairs);
    a sampling `generate` multiplies its rows by `group_size` (call option, else the
    run's, else 1; greedy generation uses 1 unless its options say otherwise); every
    other call sees the largest row count and lengths among its inputs.
    """
    keys: dict[str, _KeyInfo] = {}
    for name in set(binding.values()) & set(datasets):
        ds = datasets[name]
        pairs = {"chosen", "rejected"} <= {k for k, _ in ds.fields}
        keys[name] = _KeyInfo(config.batch * (2 if pairs else 1), ds.max_len, 0)
    sized = {}
    for call in _topological(calls):
        ins = [keys[k] for k in call.inputs if k in keys] or [_KeyInfo(config.batch, 0, 0)]
        rows, prompt_len, gen_len = max(i.rows for i in ins), max(i.prompt_len for i in ins), max(i.gen_len for i in ins)
        if call.kind is ir.CallKind.GENERATE:
            default_group = config.param("group_size", 1) if call.interface == "generate" else 1
            rows *= int(call.option("group_size", default_group))
            gen_len = call.gen_len
        for out in call.outputs:
            keys[out] = _KeyInfo(rows, prompt_len, gen_len)
        sized[call.name] = ir.Call(call.name, call.model, call.kind, call.inputs, call.outputs, call.interface,
                                   call.options, rows, prompt_len, gen_len, call.span)
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


# ---------------------------------------------------------------------------- pins


def _mesh(ref: ast.MeshRef, cluster: ir.Cluster, rep: _Reporter) -> ir.Mesh | None:
    """`node0[0:4]` / `node1` / `nodes[0:2]` as a Mesh, checked against the cluster (E015)."""
    base, dpn = ref.base.text, cluster.devices_per_node
    sliced = ref.start is not None
    if base == "nodes":
        first, count = (ref.start, ref.stop - ref.start) if sliced else (0, cluster.nodes)
        mesh, limit = ir.Mesh(first, count, 0, dpn), (first + count, cluster.nodes, "nodes")
    elif base.startswith("node") and base[4:].isdigit() and len(base) < 14:
        node = int(base[4:])
        first, count = (ref.start, ref.stop - ref.start) if sliced else (0, dpn)
        mesh = ir.Mesh(node, 1, first, count)
        if node >= cluster.nodes:
            rep.error("E015", f"node {node} is outside the cluster ({cluster.nodes} node(s))", ref.base.span,
                      f"nodes are numbered 0..{cluster.nodes - 1}")
            return None
        limit = (first + count, dpn, "devices per node")
    else:
        rep.error("E022", f"bad mesh `{base}`", ref.base.span, "meshes: node0[0:4], node1, nodes[0:2]")
        return None
    if count <= 0:
        rep.error("E015", "empty device range", ref.span, "write [start:stop] with start < stop")
        return None
    if limit[0] > limit[1]:
        rep.error("E015", f"mesh `{mesh}` is outside the cluster ({limit[1]} {limit[2]})", ref.span,
                  f"the cluster is {cluster.nodes} node(s) x {dpn} device(s)")
        return None
    return mesh


def _check_pins(unit: _Unit, calls: tuple[ir.Call, ...], names: set[str], models: dict[str, ir.Model],
                cluster: ir.Cluster, rep: _Reporter, val: _Values) -> tuple[ir.Pin, ...]:
    """`place` statements as Pins: call, mesh, degrees, head divisibility (shape checks need a bound call)."""
    by_name = {c.name: c for c in calls}
    pins: dict[str, ir.Pin] = {}
    for place in unit.statements(ast.PlaceStmt):
        call = by_name.get(place.call.text)
        if place.call.text not in names:
            rep.error("E002", f"no call `{place.call.text}` in the run's dataflow", place.call.span,
                      _suggest(place.call.text, sorted(names)) or "pins name calls of the dataflow that `run` uses")
        if place.call.text in pins:
            rep.error("E003", f"call `{place.call.text}` is pinned twice", place.call.span)
        mesh = _mesh(place.mesh, cluster, rep)
        opts = _options(place.options, rep, "`place`")
        degrees = {}
        for key, opt in opts.items():
            if key in ("dp", "tp", "pp", "n_mbs"):
                degrees[key] = val.positive_int(opt)
            else:
                val.unknown(opt.key, ("dp", "tp", "pp", "n_mbs"), "`place`")
        missing = [k for k in ("dp", "tp", "pp") if k not in opts]
        if missing:
            rep.error("E024", f"`place` needs {', '.join(missing)}", place.span, "place CALL on MESH dp = N tp = N pp = N")
        if mesh is None or missing or None in degrees.values():
            continue
        dp, tp, pp = degrees["dp"], degrees["tp"], degrees["pp"]
        if dp * tp * pp != mesh.size:
            rep.error("E016", f"dp * tp * pp = {dp * tp * pp} but mesh `{mesh}` has {mesh.size} devices",
                      place.span, "the degrees must multiply to the mesh size")
        shape = models[call.model].shape if call is not None else None
        if tp > cluster.devices_per_node:
            rep.error("E014", f"tp = {tp} spans more than one node ({cluster.devices_per_node} devices each)",
                      opts["tp"].value.span, "tensor parallelism stays inside a node")
        elif shape is not None and (shape.n_heads % tp or shape.n_kv_heads % tp):
            rep.error("E014", f"tp = {tp} does not divide the heads of `{call.model}` "
                              f"({shape.n_heads} heads, {shape.n_kv_heads} kv heads)", opts["tp"].value.span,
                      "choose tp dividing both head counts")
        pins[place.call.text] = ir.Pin(place.call.text, ir.Strategy(mesh, dp, tp, pp, degrees.get("n_mbs") or 1),
                                       place.span)
    return tuple(pins.values())


# ---------------------------------------------------------------------------- entry points


def check_program(path: str | Path, cluster_override: ir.Cluster | None = None
                  ) -> tuple[ir.Dataflow | None, list[Diagnostic]]:
    """Check a program: (the Dataflow, or None when there are errors; all diagnostics)."""
    rep, path = _Reporter(), Path(path)
    unit = _Loader(rep).load(path, str(path), None)
    if unit is None:
        return None, rep.diagnostics
    loaded = {id(u): u for u in [unit] + [u for u, _ in unit.dataflows.values()]}
    val = _Values(rep)
    checked = set()
    for owner in loaded.values():
        for _, decl in owner.dataflows.values():
            if id(decl) not in checked:
                checked.add(id(decl))
                _check_dataflow_structure(decl, rep)
    cluster = _check_cluster(unit, rep, val)
    if cluster_override is not None:
        cluster = cluster_override
    models = {n: _check_model(d, unit, rep, val) for n, d in unit.models.items()}
    datasets = {n: _check_dataset(d, unit, rep, val) for n, d in unit.datasets.items()}
    runs = unit.statements(ast.RunStmt)
    config, calls, edges, pins = None, (), (), ()
    if runs:
        config = _run_config(runs[0], rep, val)
        calls, edges, names = _instantiate(unit, runs[0], models, datasets, config, rep)

        pins = _check_pins(unit, calls, names, models, cluster, rep, val)
    elif unit.statements(ast.PlaceStmt):
        rep.error("E002", "`place` without a `run`: there are no calls to pin", unit.statements(ast.PlaceStmt)[0].span)
    if runs and not rep.has_errors:  # unused declarations matter once the program is otherwise right
        used = {a.text for a in runs[0].args}
        for decl in [*unit.models.values(), *unit.datasets.values()]:
            if decl.name.text not in used:
                rep.warning("W002", f"`{decl.name.text}` is declared but the `run` does not use it", decl.name.span,
                            "pass it to the dataflow, or delete it")
    rep.diagnostics.sort(key=lambda d: (d.span.file, d.span.line, d.span.col) if d.span else ("", 0, 0))
    if rep.has_errors:
        return None, rep.diagnostics
    flow = ir.Dataflow(str(_resolved(path)), tuple(models.values()), tuple(datasets.values()), calls, edges,
                       cluster, config, pins)
    return flow, rep.diagnostics


def load_program(path: str | Path, cluster_override: ir.Cluster | None = None) -> ir.Dataflow:
    """The checked Dataflow of a program, or `CompileError` carrying every diagnostic."""
    flow, diagnostics = check_program(path, cluster_override)
    if flow is None:
        raise CompileError(diagnostics)
    return flow
