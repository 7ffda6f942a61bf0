"""Syntax highlighting of `.rlhf` programs for Pygments (terminals, Sphinx, HTML docs).

Registered under the `pygments.lexers` entry point, so `pygmentize -l rlhf FILE` and
any Pygments-based tool find it. The word lists below are the language's; a test
checks that the TextMate grammar (`grammar/rlhf.tmLanguage.json`, for editors) uses
the same lists, so the two highlighters cannot drift apart.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, include, words
from pygments.token import (
    Comment,
    Error,
    Keyword,
    Name,
    Number,
    Operator,
    Punctuation,
    String,
    Whitespace,
)

IMPORT_KEYWORDS = ("import", "from")
DECLARATION_KEYWORDS = ("model", "dataset", "dataflow", "cluster")
OTHER_KEYWORDS = ("run", "place", "on", "using", "trainable")
CALL_KINDS = ("generate", "inference", "train")
# Constructors (models: hf, llama its older spelling, rule, python; datasets: jsonl,
# parquet, datasets, data) and optimizers.
BUILTIN_FUNCTIONS = ("hf", "llama", "rule", "python", "jsonl", "parquet", "datasets", "data", "adam", "adamw")
SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB")

_ID = r"[A-Za-z_][A-Za-z0-9_]*"
_UNIT = "(?:" + "|".join(SIZE_UNITS) + r")(?:/s)?"
_END = r"(?![A-Za-z0-9_])"


class RlhfLexer(RegexLexer):
    """Tokens of the `.rlhf` language (docs/language.md), with the same roles the
    TextMate grammar gives them: declarations, call kinds, interfaces, keys, sizes."""

    name = "rlhf"
    aliases = ["rlhf"]
    filenames = ["*.rlhf"]
    mimetypes = ["text/x-rlhf"]
    url = "https://github.com/rlhfc/rlhfc"

    tokens = {
        "root": [
            (r"\s+", Whitespace),
            (r"//.*?$", Comment.Single),
            (r"/\*", Comment.Multiline, "block_comment"),
            (r'"', String.Double, "string"),
            (rf"(dataflow)(\s+)({_ID})", bygroups(Keyword.Declaration, Whitespace, Name.Function)),
            (rf"(run)(\s+)({_ID})", bygroups(Keyword, Whitespace, Name.Function)),
            (rf"(model|dataset)(\s+)({_ID})", bygroups(Keyword.Declaration, Whitespace, Name.Variable)),
            (
                rf"(place)(\s+)({_ID})(\s+)(on)(\s+)(nodes|node[0-9]+)\b",
                bygroups(Keyword, Whitespace, Name.Function, Whitespace, Keyword, Whitespace, Name.Constant),
            ),
            (
                rf"({_ID})(\s*)(=)(\s*)({_ID})(\s*)(\.)(\s*)({'|'.join(CALL_KINDS)})\b",
                bygroups(Name.Function, Whitespace, Operator, Whitespace, Name.Variable,
                         Whitespace, Punctuation, Whitespace, Keyword.Pseudo),
            ),
            (rf"(using)(\s+)({_ID})", bygroups(Keyword, Whitespace, Name.Builtin)),
            (r"(head)(\s*)(=)(\s*)(lm|value)\b",
             bygroups(Name.Attribute, Whitespace, Operator, Whitespace, Keyword.Constant)),
            (words(IMPORT_KEYWORDS, suffix=r"\b"), Keyword.Namespace),
            (words(DECLARATION_KEYWORDS, suffix=r"\b"), Keyword.Declaration),
            (words(OTHER_KEYWORDS, suffix=r"\b"), Keyword),
            (words(CALL_KINDS, prefix=r"\b", suffix=r"\b"), Keyword.Pseudo),
            (words(("true", "false"), suffix=r"\b"), Keyword.Constant),
            (words(BUILTIN_FUNCTIONS, suffix=r"(?=\s*\()"), Name.Builtin),
            include("numbers"),
            (rf"{_ID}(?=\s*=)", Name.Attribute),
            (_ID, Name),
            (r"->|=|:", Operator),
            (r"\.", Punctuation),
            (r"[{}()\[\],]", Punctuation),
        ],
        "numbers": [
            (rf"-?([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?({_UNIT})?{_END}", Number.Float),
            (rf"-?[0-9]+[eE][+-]?[0-9]+({_UNIT})?{_END}", Number.Float),
            (rf"-?[0-9]+({_UNIT})?{_END}", Number.Integer),
        ],
        "string": [
            (r'\\["\\nt]', String.Escape),
            (r'[^"\\\n]+', String.Double),
            (r'"', String.Double, "#pop"),
            (r"\n", Error, "#pop"),  # strings end on their line, as in the parser
        ],
        "block_comment": [
            (r"[^*]+", Comment.Multiline),
            (r"\*/", Comment.Multiline, "#pop"),
            (r"\*", Comment.Multiline),
        ],
    }
