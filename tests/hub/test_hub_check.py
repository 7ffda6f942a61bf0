"""`hf(...)` and hub ids in the checker: a cached hub id sizes the model from its
config.json and lends its tokenizer; one that cannot be resolved is a located E017;
`llama(...)` means what `hf(...)` means."""

from __future__ import annotations

import json
import os

from hub_fixtures import REPO, rlhfc, sft_program

from rlhfc import ir
from rlhfc.backend.emit import program_spec
from rlhfc.driver import compile_program
from rlhfc.frontend.check import check_program, load_program
from rlhfc.frontend.graph import dump
from rlhfc_runtime.contract.resume import resolve_paths


def test_a_cached_hub_id_gives_the_shape_and_the_tokenizer(offline, tmp_path):
    path = sft_program(tmp_path, f'hf("{REPO}")')
    flow = load_program(path)
    actor = flow.model("actor")
    assert actor.checkpoint == f"hf://{REPO}" and actor.kind == "llama"
    assert actor.shape == ir.ModelShape(2, 32, 4, 2, 64, 64, 64, False)
    assert flow.datasets[0].tokenizer == f"hf://{REPO}"  # the default: the checkpoint's own
    prog, text = compile_program(path, output=tmp_path / "prog.py")
    assert f"checkpoint='hf://{REPO}'" in text  # the generated program keeps the id
    spec = program_spec(prog, str(tmp_path))
    assert spec.models["actor"].checkpoint == spec.datasets["demos"].tokenizer == f"hf://{REPO}"
    snapshot = str(offline / "hub" / "models--tiny-org--tiny-llama" / "snapshots")
    resolved = resolve_paths(spec, tmp_path)
    assert resolved.models["actor"].checkpoint.startswith(snapshot)
    assert resolved.datasets["demos"].tokenizer == resolved.models["actor"].checkpoint


def test_revisions_and_an_explicit_tokenizer_id(offline, tmp_path):
    flow = load_program(sft_program(tmp_path, f'hf("{REPO}@main")', f', tokenizer = "hf://{REPO}"'))
    assert flow.model("actor").checkpoint == f"hf://{REPO}@main"
    assert flow.datasets[0].tokenizer == f"hf://{REPO}"


def test_a_local_directory_of_that_name_is_a_path(offline, tmp_path):
    local = tmp_path / REPO
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({
        "num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 256}))
    actor = load_program(sft_program(tmp_path, f'hf("{REPO}")')).model("actor")
    assert actor.checkpoint == str(local.resolve()) and actor.shape.n_layers == 3


def test_llama_is_the_same_constructor(offline, tmp_path):
    for args in (f'"{REPO}"', 'preset = "tiny"', "layers = 2, hidden = 64, heads = 4, intermediate = 128, vocab = 64"):
        flows = [load_program(sft_program(tmp_path, f"{ctor}({args}, head = lm)", name=f"{ctor}.rlhf"))
                 for ctor in ("hf", "llama")]
        dumps = [dump(f, str(tmp_path)).replace(f"{ctor}.rlhf", "X") for f, ctor in zip(flows, ("hf", "llama"))]
        assert dumps[0] == dumps[1]
    _, diagnostics = check_program(sft_program(tmp_path, 'hf(preset = "tiny", heads_count = 4)'))
    assert [d.message for d in diagnostics if d.is_error] == ["unknown key `heads_count` in `hf(...)`"]


def test_rlhfc_check_passes_on_a_cached_id(offline, tmp_path):
    result = rlhfc("check", str(sft_program(tmp_path, f'hf("{REPO}")')))
    assert result.returncode == 0, result.stderr


def test_an_unresolvable_id_is_a_located_e017_naming_the_cache_switches(offline, tmp_path):
    prog = sft_program(tmp_path, 'hf("tiny-org/missing")', ', tokenizer = "tiny-org/missing-tok@v2"')
    result = rlhfc("check", str(prog))
    assert result.returncode == 1
    out = result.stderr
    assert "error[E017]: hub id `tiny-org/missing` is not in the Hugging Face cache" in out
    assert f"{prog}:2:18" in out or f"{os.path.relpath(prog)}:2:18" in out
    assert "error[E017]: hub id `tiny-org/missing-tok@v2` is not in the Hugging Face cache" in out
    assert "HF_HUB_OFFLINE is set" in out and "HF_HOME" in out and str(offline / "hub") in out
    assert "Traceback" not in out


def test_an_hf_url_that_spells_no_id_is_e017(offline, tmp_path):
    _, diagnostics = check_program(sft_program(tmp_path, 'hf("hf://no-owner")', ', tokenizer = "hf://a/b/c"'))
    errors = [(d.code, d.message, d.span.line) for d in diagnostics if d.is_error]
    assert errors == [("E017", "`hf://no-owner` is not a Hugging Face hub id", 2),
                      ("E017", "`hf://a/b/c` is not a Hugging Face hub id", 3)]
