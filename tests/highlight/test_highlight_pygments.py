"""The Pygments lexer: every shipped program lexes cleanly, tokens get the right
types, the word lists agree with the parser's grammar and the TextMate grammar, and
`pygmentize -l rlhf` finds the lexer through the package's entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pygments.token import Comment, Error, Keyword, Name, Number, Operator, String

from rlhfc.frontend import highlight
from rlhfc.frontend.highlight import RlhfLexer

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("programs/*.rlhf"), *ROOT.glob("stdlib/*.rlhf")])
ALL_WORDS = (
    highlight.IMPORT_KEYWORDS
    + highlight.DECLARATION_KEYWORDS
    + highlight.OTHER_KEYWORDS
    + highlight.CALL_KINDS
)


def lex(text: str) -> list[tuple[object, str]]:
    """Non-whitespace tokens of `text`, as (token type, text) pairs."""
    return [(t, v) for t, v in RlhfLexer().get_tokens(text) if v.strip()]


def types_of(text: str, word: str) -> set[object]:
    return {t for t, v in lex(text) if v == word}


def test_shipped_files_exist():
    names = {p.name for p in SHIPPED}
    assert {"ppo.rlhf", "grpo.rlhf", "remax.rlhf", "rloo.rlhf", "dpo.rlhf", "sft.rlhf",
            "reward_model.rlhf", "ppo_70b.rlhf", "ppo_7b.rlhf"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_lexes_without_errors(path: Path):
    text = path.read_text()
    tokens = list(RlhfLexer().get_tokens(text))
    errors = [v for t, v in tokens if t in Error]
    assert not errors, f"{path}: error tokens {errors}"
    assert "".join(v for _, v in tokens) == text  # shipped files end with a newline
    keyword_texts = {v for t, v in tokens if t in Keyword}
    assert keyword_texts & {"dataflow", "run"}, "every file declares or runs a dataflow"


def test_token_types_of_a_program():
    text = (
        'import ppo from "stdlib/ppo.rlhf"  // the library\n'
        'cluster { nodes = 2  memory = 80GiB  inter_bandwidth = 900GB/s }\n'
        'model critic = llama("ckpt/rm", head = value) { trainable  optimizer = adam(lr = 1e-6) }\n'
        'dataset p = jsonl("a \\"q\\" \\n", field = "prompt", max_len = 256)\n'
        "/* a block\n   comment */\n"
        "dataflow f(actor, p) {\n"
        "    g = actor.generate(p) -> seq, logp\n"
        "    t = actor.train(seq, logp) using grpo_actor { n_mbs = 4  top_p = 0.9  x = true }\n"
        "}\n"
        "place t on node0[0:4] dp = 2 tp = 2 pp = 1\n"
    )
    for word in ("import", "from"):
        assert types_of(text, word) == {Keyword.Namespace}
    for word in ("cluster", "model", "dataset", "dataflow"):
        assert types_of(text, word) == {Keyword.Declaration}
    for word in ("trainable", "using", "place", "on"):
        assert types_of(text, word) == {Keyword}
    assert types_of(text, "generate") == types_of(text, "train") == {Keyword.Pseudo}
    assert types_of(text, "llama") == types_of(text, "adam") == types_of(text, "jsonl") == {Name.Builtin}
    assert types_of(text, "grpo_actor") == {Name.Builtin}
    assert types_of(text, "value") == types_of(text, "true") == {Keyword.Constant}
    assert types_of(text, "node0") == {Name.Constant}
    assert types_of(text, "f") == types_of(text, "g") == {Name.Function}
    assert types_of(text, "critic") == {Name.Variable}
    assert types_of(text, "max_len") == {Name.Attribute}
    assert types_of(text, "->") == {Operator}
    for literal, kind in (("80GiB", Number.Integer), ("900GB/s", Number.Integer),
                          ("1e-6", Number.Float), ("0.9", Number.Float), ("256", Number.Integer)):
        assert types_of(text, literal) == {kind}, literal
    assert types_of(text, "// the library") == {Comment.Single}
    assert types_of(text, "/* a block\n   comment */") == set() and any(
        t in Comment.Multiline for t, _ in lex(text))
    assert {t for t, v in lex(text) if v in ('\\"', "\\n")} == {String.Escape}
    assert types_of(text, "stdlib/ppo.rlhf") == {String.Double}
    assert not [v for t, v in lex(text) if t in Error]


@pytest.mark.parametrize("literal", ["7", "-3", "0.05", "1e-6", "2.5E+3", ".5", "1.",
                                     "80GiB", "512MiB", "16GB", "1TiB", "1.5TB", "900GB/s"])
def test_number_literals_are_one_number_token(literal: str):
    (key, _), (eq, _), (kind, text) = lex(f"x = {literal}")
    assert (key, eq, text) == (Name.Attribute, Operator, literal)
    assert kind in Number


@pytest.mark.parametrize("bad", ['"unknown \\q escape"', '"unterminated\n"', "x = @", "1x2"])
def test_invalid_input_shows_error_tokens(bad: str):
    assert any(t in Error for t, _ in RlhfLexer().get_tokens(bad))


def test_word_lists_are_the_parser_grammars_keywords():
    lark_text = (ROOT / "grammar" / "rlhf.lark").read_text()
    literals = set(re.findall(r'"([a-z_]+)"', lark_text))
    assert set(highlight.IMPORT_KEYWORDS + highlight.DECLARATION_KEYWORDS
               + highlight.OTHER_KEYWORDS) == literals - {"true", "false"}


def test_word_lists_match_the_textmate_grammar():
    tm_text = json.dumps(json.loads((ROOT / "grammar" / "rlhf.tmLanguage.json").read_text()))
    alternations = {frozenset(group.split("|")) for group in re.findall(r"\(([a-z_|]+)\)", tm_text)}
    for words in (highlight.IMPORT_KEYWORDS, highlight.DECLARATION_KEYWORDS,
                  highlight.OTHER_KEYWORDS, highlight.CALL_KINDS, highlight.BUILTIN_FUNCTIONS):
        assert frozenset(words) in alternations, words
    assert "|".join(highlight.SIZE_UNITS) in tm_text


def test_pygmentize_finds_the_lexer_through_the_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="pygments.lexers")}
    assert names.get("rlhf") == "rlhfc.frontend.highlight:RlhfLexer", "reinstall: pip install -e ."
    out = subprocess.run(
        [sys.executable, "-m", "pygments", "-l", "rlhf", "-f", "raw", str(ROOT / "stdlib" / "ppo.rlhf")],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "Token.Keyword.Declaration\t'dataflow'" in out
    assert "Token.Keyword.Pseudo\t'generate'" in out
    guessed = subprocess.run(
        [sys.executable, "-m", "pygments", "-N", "programs/ppo.rlhf"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.strip()
    assert guessed == "rlhf"
