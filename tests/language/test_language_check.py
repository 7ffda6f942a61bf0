"""The checker's meaning: sizes, edges, shapes, imports, pins, cluster override, public API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfc import ir
from rlhfc.frontend.check import check_program, load_program
from rlhfc.diagnostics import CompileError
from rlhfc.frontend.presets import PRESETS

TINY = 'model actor = llama(preset = "tiny") { trainable  optimizer = adam(lr = 1e-3) }\n' \
       'model ref = llama(preset = "tiny")\nmodel reward = rule("pattern_reward")\n'


def _write(tmp_path: Path, text: str, name: str = "prog.rlhf") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _codes(path: Path) -> list[str]:
    return [d.code for d in check_program(path)[1] if d.is_error]


def test_group_sampling_multiplies_batch_downstream_of_generate(tmp_path):
    prog = _write(tmp_path, 'import grpo from "stdlib/grpo.rlhf"\n' + TINY +
                  'dataset p = jsonl("p.jsonl", field = "prompt", max_len = 20)\n'
                  'run grpo(actor, ref, reward, p) { batch = 8  max_new_tokens = 5  group_size = 4 }\n')
    flow = load_program(prog)
    sizes = {c.name: (c.batch, c.prompt_len, c.gen_len) for c in flow.calls}
    assert sizes == {"gen": (32, 20, 5), "score": (32, 20, 5), "refl": (32, 20, 5), "a_tr": (32, 20, 5)}
    assert flow.run.param("group_size") == 4


def test_greedy_generation_is_not_grouped_and_call_options_override_run(tmp_path):
    prog = _write(tmp_path, 'import remax from "stdlib/remax.rlhf"\n' + TINY +
                  'dataset p = jsonl("p.jsonl", field = "prompt", max_len = 8)\n'
                  'run remax(actor, ref, reward, p) { batch = 4  max_new_tokens = 6  group_size = 2 }\n')
    calls = {c.name: c for c in load_program(prog).calls}
    assert (calls["gen"].batch, calls["greedy"].batch, calls["base"].batch) == (8, 4, 4)
    assert calls["a_tr"].batch == 8 and calls["a_tr"].seq_len == 14


def test_pair_data_counts_two_sequences_per_row(tmp_path):
    prog = _write(tmp_path, 'import dpo from "stdlib/dpo.rlhf"\n' + TINY +
                  'dataset d = jsonl("d.jsonl", prompt = "p", chosen = "c", rejected = "r", max_len = 32)\n'
                  'run dpo(actor, ref, d) { batch = 16 }\n')
    flow = load_program(prog)
    # 16 rows of 2 sequences; each sequence: a 32-token prompt, a 32-token response + eos
    assert [(c.name, c.batch, c.rows, c.prompt_len, c.gen_len) for c in flow.calls] == [
        ("refl", 32, 16, 32, 33), ("a_tr", 32, 16, 32, 33)]
    assert flow.edges == (ir.Edge("refl", "a_tr", ir.EdgeKind.DATA, "ref_logp"),)


def test_parameter_edges_order_a_trainable_models_calls_across_iterations(tmp_path):
    prog = _write(tmp_path, TINY + 'dataset p = jsonl("p.jsonl", field = "prompt", max_len = 8)\n'
                  'dataflow f(actor, p) {\n  gen = actor.generate(p) -> seq, logp  { max_new_tokens = 3 }\n'
                  '  lp = actor.inference(seq) -> lp2\n  tr = actor.train(p) using sft\n}\n'
                  'run f(actor, p) { batch = 2 }\n')
    flow = load_program(prog)
    param = {(e.src, e.dst, e.next_iteration) for e in flow.edges if e.kind is ir.EdgeKind.PARAM}
    assert param == {("gen", "tr", False), ("lp", "tr", False), ("tr", "gen", True), ("tr", "lp", True)}
    assert flow.call("gen").gen_len == 3 and flow.call("gen").option("max_new_tokens") == 3


def test_checkpoint_config_json_gives_the_shape(tmp_path):
    ckpt = tmp_path / "ckpt" / "actor"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({
        "num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 256, "tie_word_embeddings": True}))
    prog = _write(tmp_path, 'model actor = llama("ckpt/actor", head = value)\n')
    model = load_program(prog).model("actor")
    assert model.shape == ir.ModelShape(3, 48, 6, 2, 96, 100, 256, True)
    assert model.head is ir.Head.VALUE and Path(model.checkpoint) == ckpt.resolve()
    (ckpt / "config.json").write_text("{ not json")
    assert _codes(prog) == ["E017"]


def test_presets_match_the_public_llama_configs():
    assert PRESETS["llama-2-7b"].param_count() == 6_738_415_616
    assert PRESETS["llama-2-70b"].n_kv_heads == 8 and PRESETS["codellama-34b"].n_heads == 64


def test_relative_imports_and_the_import_cycle(tmp_path):
    (tmp_path / "lib").mkdir()
    _write(tmp_path / "lib", "dataflow tune(m, d) {\n  t = m.train(d) using sft\n}\n", "lib.rlhf")
    prog = _write(tmp_path, 'import tune from "lib/lib.rlhf"\n' + TINY +
                  'dataset d = jsonl("d.jsonl", prompt = "p", response = "r", max_len = 8)\nrun tune(actor, d) { batch = 2 }\n')
    flow = load_program(prog)
    assert [c.name for c in flow.calls] == ["t"] and flow.calls[0].span.file.endswith("lib.rlhf")
    _write(tmp_path / "lib", 'import tune from "../prog.rlhf"\n', "lib.rlhf")
    assert "E021" in _codes(prog)


def test_cluster_override_replaces_the_programs_cluster_and_pins_follow_it(tmp_path):
    prog = _write(tmp_path, 'import sft from "stdlib/sft.rlhf"\ncluster { nodes = 2  devices_per_node = 8  device = "H100-80GB" }\n'
                  + TINY + 'dataset d = jsonl("d.jsonl", field = "t", max_len = 8)\nrun sft(actor, d) { batch = 2 }\n'
                  'place a_tr on nodes[0:2] dp = 8 tp = 2 pp = 1\n')
    flow = load_program(prog)
    assert flow.pins[0].strategy == ir.Strategy(ir.Mesh(0, 2, 0, 8), 8, 2, 1)  # no budget: one micro-batch
    small = ir.Cluster(1, 4, "cpu")
    with pytest.raises(CompileError) as error:
        load_program(prog, cluster_override=small)
    assert [d.code for d in error.value.diagnostics if d.is_error] == ["E015"]


@pytest.mark.parametrize("mesh, expected", [
    ("node0[0:4]", ir.Mesh(0, 1, 0, 4)), ("node1", ir.Mesh(1, 1, 0, 8)), ("node1[4:8]", ir.Mesh(1, 1, 4, 4)),
    ("nodes[0:2]", ir.Mesh(0, 2, 0, 8)), ("nodes", ir.Mesh(0, 2, 0, 8))])
def test_mesh_syntax(tmp_path, mesh, expected):
    prog = _write(tmp_path, 'import sft from "stdlib/sft.rlhf"\ncluster { nodes = 2  devices_per_node = 8  device = "H200" }\n'
                  + TINY + 'dataset d = jsonl("d.jsonl", field = "t", max_len = 8)\nrun sft(actor, d) { batch = 32 }\n'
                  f'place a_tr on {mesh} dp = {expected.size} tp = 1 pp = 1 n_mbs = 2\n')  # 2 micro-batches of each dp part
    flow = load_program(prog)
    pin = flow.pins[0]
    assert pin.strategy.mesh == expected and pin.call == "a_tr"
    assert flow.call("a_tr").n_mbs(pin.strategy) == 2  # the pin's budget: half a replica's rows
    assert pin.strategy.token_budget == 32 // expected.size // 2 * flow.call("a_tr").seq_len


def test_defaults_units_and_a_library_file(tmp_path):
    prog = _write(tmp_path, "/* just a cluster */ cluster { device = \"H200\"  memory = 141GB  intra_bandwidth = 900GB/s }\n")
    flow = load_program(prog)
    assert flow.cluster == ir.Cluster(1, 1, "H200", (("intra_bandwidth", 9e11), ("memory", 1.41e11)))
    assert flow.run is None and flow.calls == ()
    assert load_program(_write(tmp_path, "", "empty.rlhf")).cluster == ir.Cluster(1, 1, "cpu")


def test_load_program_raises_with_every_diagnostic(tmp_path):
    prog = _write(tmp_path, 'model a = llama(preset = "nope")\nmodel b = rule("nope")\ncluster { device = "tpu" }\n')
    with pytest.raises(CompileError) as error:
        load_program(prog)
    assert [d.code for d in error.value.diagnostics] == ["E025", "E009", "E019"]
    assert all(d.span.file == str(prog) and d.line_text for d in error.value.diagnostics)


@pytest.mark.parametrize("statement", [
    'import x from "{long}"', 'import x from "stdlib/{long}"', 'model m = llama("{long}")',
    'dataset d = jsonl("{long}", field = "p", max_len = 3, tokenizer = "{long}/t")',
    'import x from "."', 'import x from "stdlib/"'])
def test_unusable_paths_are_diagnostics(tmp_path, statement):
    prog = _write(tmp_path, statement.format(long="a" * 5000) + "\n")
    flow, diagnostics = check_program(prog)
    assert diagnostics and {d.code for d in diagnostics} <= {"E020", "E017", "W001"}


def _grpo(tmp_path, run_keys: str, call_options: str = "") -> Path:
    lib = _write(tmp_path, "dataflow grpo(actor, ref, reward, prompts) {\n"
                 "    gen   = actor.generate(prompts)                 -> seq, logp\n"
                 "    score = reward.inference(seq)                   -> score\n"
                 "    refl  = ref.inference(seq)                      -> ref_logp\n"
                 f"    a_tr  = actor.train(seq, logp, ref_logp, score)  using grpo_actor {call_options}\n}}\n",
                 "lib.rlhf")
    return _write(tmp_path, f'import grpo from "./{lib.name}"\n' + TINY +
                  'dataset p = jsonl("p.jsonl", field = "prompt", max_len = 8)\n'
                  f'run grpo(actor, ref, reward, p) {{ batch = 4  max_new_tokens = 6  group_size = 2  {run_keys} }}\n')


def test_hyper_parameters_are_checked_and_located(tmp_path):
    """The issue's done-when cases: a misspelt key, a bad choice; and bad call options."""
    def errors(path):
        diags = [d for d in check_program(path)[1] if d.is_error]
        assert all(d.code == "E022" for d in diags)
        return {d.message.split("`")[1]: d for d in diags}

    path = _grpo(tmp_path, 'kl_coeff = 0.01  loss_agg = "bogus"')
    run_line = path.read_text().splitlines()[5]
    found = errors(path)
    assert set(found) == {"kl_coeff", "loss_agg"}
    assert "kl_coef" in found["kl_coeff"].hint
    assert (found["kl_coeff"].span.line, found["kl_coeff"].span.col) == (6, run_line.index("kl_coeff") + 1)
    assert "'seq-mean-token-sum-norm'" in found["loss_agg"].message
    assert (found["loss_agg"].span.line, found["loss_agg"].span.col) == (6, run_line.index('"bogus"') + 1)
    found = errors(_grpo(tmp_path, "", "{ mini_batches = 0  clip_hi = 0.3 }"))
    assert set(found) == {"mini_batches", "clip_hi"}
    assert "[1, inf]" in found["mini_batches"].message and found["mini_batches"].span.line == 5
    assert "clip_high" in found["clip_hi"].hint


def test_clip_sets_both_sides_unless_they_are_set(tmp_path):
    from rlhfc.frontend.check.settings import resolve

    flow = load_program(_grpo(tmp_path, "clip = 0.3", "{ clip_high = 0.28 }"))
    settings = dict(resolve(next(c for c in flow.calls if c.name == "a_tr"), flow.run, 2))
    assert (settings["clip_low"], settings["clip_high"], settings["clip"]) == (0.3, 0.28, 0.3)
    assert settings["max_new_tokens"] == 6 and settings["steps"] == 1 and settings["kl_estimator"] == "k3"


def test_a_call_option_is_checked_like_the_same_run_key(tmp_path):
    """Call options and run-block keys are one set of contract settings with one range:
    what the run block allows the call allows, what it refuses the call refuses."""
    def dataflow(options: str) -> Path:
        return _write(tmp_path, 'model actor = llama(preset = "tiny") { trainable }\n'
                      'dataset p = jsonl("p.jsonl", field = "prompt", max_len = 8)\n'
                      f'dataflow d(actor, p) {{ gen = actor.generate(p) -> seq, logp  {{ {options} }} }}\n'
                      'run d(actor, p) { batch = 4  max_new_tokens = 4 }\n')

    flow = load_program(dataflow('top_k = 0  precision = "bf16"'))
    settings = dict(flow.call("gen").settings)
    assert (settings["top_k"], settings["precision"]) == (0, "bf16")
    found = [d for d in check_program(dataflow("top_p = 1.5"))[1] if d.is_error]
    assert [d.code for d in found] == ["E022"] and "top_p" in found[0].message and "[1e-06, 1]" in found[0].message


def test_a_setting_of_the_wrong_kind_is_located_not_a_crash(tmp_path):
    """Found by the mutation fuzzer: `kl_coef = x001` (a name) crashed while settings
    were resolved, before the E022 about it could be shown."""
    from rlhfc.frontend.check import check_program

    root = Path(__file__).resolve().parents[2]
    text = (root / "programs" / "ppo.rlhf").read_text().replace("kl_coef = 0.01", "kl_coef = x001")
    prog = tmp_path / "p.rlhf"
    prog.write_text(text.replace("\"../data/", f"\"{root}/data/"))
    _, diagnostics = check_program(prog)
    assert [d.code for d in diagnostics if d.severity.value == "error"] == ["E022"]
    assert "`kl_coef` must be a number" in diagnostics[0].message
