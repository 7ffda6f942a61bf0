"""The TextMate grammar, run by the engine VS Code itself uses (vscode-textmate with
the Oniguruma regex library, installed with `vscode-tmgrammar-test` by `npm install`
in editors/vscode): the scope assertions in tmgrammar/ hold, and every shipped
program and library file tokenizes with the expected scopes. The engine tests skip
only where `node` is not on PATH; with node present, missing node_modules is a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhfc.frontend import highlight

ROOT = Path(__file__).resolve().parents[2]
GRAMMAR = ROOT / "grammar" / "rlhf.tmLanguage.json"
EXTENSION = ROOT / "editors" / "vscode"
FIXTURES = sorted((ROOT / "tests" / "highlight" / "tmgrammar").glob("*.rlhf"))
SHIPPED = sorted([*ROOT.glob("programs/*.rlhf"), *ROOT.glob("stdlib/*.rlhf")])
TOKENIZE_JS = Path(__file__).with_name("tmgrammar_tokenize.js")
TMGRAMMAR_TEST = EXTENSION / "node_modules" / ".bin" / "vscode-tmgrammar-test"

# Scope prefixes each class of word must carry where it appears as code.
WORD_SCOPES = {
    **{w: "keyword.control.import.rlhf" for w in highlight.IMPORT_KEYWORDS},
    **{w: "storage.type.rlhf" for w in highlight.DECLARATION_KEYWORDS},
    **{w: "keyword.other.rlhf" for w in highlight.OTHER_KEYWORDS},
    **{w: "keyword.other.call-kind.rlhf" for w in highlight.CALL_KINDS},
    **{w: "support.function.builtin.rlhf" for w in highlight.BUILTIN_FUNCTIONS},
}


def test_extension_ships_an_identical_copy_of_the_grammar():
    package = json.loads((EXTENSION / "package.json").read_text())
    (grammar_entry,) = package["contributes"]["grammars"]
    (language,) = package["contributes"]["languages"]
    copy = EXTENSION / grammar_entry["path"]
    assert copy.read_bytes() == GRAMMAR.read_bytes(), "copy grammar/rlhf.tmLanguage.json into the extension"
    assert grammar_entry["scopeName"] == json.loads(GRAMMAR.read_text())["scopeName"] == "source.rlhf"
    assert grammar_entry["language"] == language["id"] and language["extensions"] == [".rlhf"]
    config = json.loads((EXTENSION / language["configuration"]).read_text())
    assert config["comments"] == {"lineComment": "//", "blockComment": ["/*", "*/"]}
    assert "vscode-tmgrammar-test" in package["devDependencies"]
    assert (EXTENSION / "package-lock.json").is_file()


def test_grammar_regexes_compile_where_python_can_read_them():
    """A cheap syntax check without node; Oniguruma-only constructs are not used."""
    patterns = re.findall(r'"(?:match|begin|end)": ("(?:[^"\\]|\\.)*")', GRAMMAR.read_text())
    assert len(patterns) > 20
    for pattern in patterns:
        re.compile(json.loads(pattern))


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the TextMate engine tests need node (and npm install in editors/vscode)")
    assert TMGRAMMAR_TEST.exists(), "run `npm install` in editors/vscode (scripts/test.sh does)"
    return node


def run_scope_assertions(node: str, fixtures: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [node, str(TMGRAMMAR_TEST), "--compact", "-g", str(GRAMMAR), *map(str, fixtures)],
        capture_output=True, text=True, cwd=EXTENSION, timeout=60,
    )


def test_scope_assertions_hold(node: str):
    assert len(FIXTURES) >= 2
    result = run_scope_assertions(node, FIXTURES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("successfuly") == len(FIXTURES), result.stdout


def test_a_wrong_scope_assertion_fails(node: str, tmp_path: Path):
    """The harness really checks: an assertion contradicting the grammar is reported."""
    fixture = tmp_path / "wrong.rlhf"
    fixture.write_text('// SYNTAX TEST "source.rlhf"\nmodel m = rule("r")\n// <----- string.quoted.double.rlhf\n')
    result = run_scope_assertions(node, [fixture])
    assert result.returncode != 0 and "string.quoted.double.rlhf" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def shipped_tokens(node: str) -> dict[str, list[tuple[int, str, list[str]]]]:
    out = subprocess.run(
        [node, str(TOKENIZE_JS), str(GRAMMAR), *map(str, SHIPPED)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return json.loads(out)


def test_shipped_files_tokenize_with_expected_scopes(shipped_tokens):
    assert set(shipped_tokens) == {str(p) for p in SHIPPED}
    for path, tokens in shipped_tokens.items():
        assert tokens, path
        source = Path(path).read_text().splitlines()
        for line, text, scopes in tokens:
            where = f"{path}:{line}: {text!r} {scopes}"
            called = re.search(rf"\b{re.escape(text)}\s*\(", source[line - 1]) if text.strip() else None
            assert scopes[0] == "source.rlhf", where
            assert not any(s.startswith("invalid") for s in scopes), where
            if not text.strip():
                continue
            assert len(scopes) >= 2, f"unscoped code at {where}"
            if any(s.startswith(("comment", "string")) for s in scopes):
                continue
            # a builtin's name is a builtin where it is called (`data(...)`), a name elsewhere
            if text in WORD_SCOPES and (text not in highlight.BUILTIN_FUNCTIONS or called):
                assert WORD_SCOPES[text] in scopes, where
            if re.fullmatch(r"-?[0-9][0-9.]*(e-?[0-9]+)?", text):
                assert "constant.numeric.rlhf" in scopes, where


def test_every_shipped_call_has_a_call_kind_and_model(shipped_tokens):
    """Each `NAME = MODEL.KIND(` line of the library gets the call-definition scopes."""
    for path, tokens in shipped_tokens.items():
        if "/stdlib/" not in path:
            continue
        kinds = [text for _, text, scopes in tokens if "keyword.other.call-kind.rlhf" in scopes]
        calls = [text for _, text, scopes in tokens if "entity.name.function.call.rlhf" in scopes]
        models = [text for _, text, scopes in tokens if "variable.other.model.rlhf" in scopes]
        source_calls = re.findall(r"^\s*(\w+)\s*=\s*(\w+)\.(\w+)\(", Path(path).read_text(), re.M)
        assert calls == [c for c, _, _ in source_calls], path
        assert models == [m for _, m, _ in source_calls], path
        assert kinds == [k for _, _, k in source_calls], path
