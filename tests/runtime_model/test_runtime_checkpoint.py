"""HF checkpoints <-> shards: load reads exactly `full[shard_slices]`, save writes back
the same tensors file-for-file (transformers loads them), sharded index files load,
random init is layout-independent — one spawned 4-process gloo world."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.dist import ensure_groups, spawn
from rlhfc_runtime.contract.layout import Layout

CONFIG = ck.tiny_config(num_hidden_layers=4)
LAYOUTS = [(1, 1, 1), (1, 2, 2), (2, 2, 1), (1, 1, 4), (4, 1, 1), (2, 1, 2)]


def _full(path):
    """Every tensor of an HF checkpoint directory, from model.safetensors or its index."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    out = {}
    for file in set(json.loads(index.read_text())["weight_map"].values()):
        out.update(load_file(str(path / file)))
    return out


def _roundtrip(dirs, out_root):
    import torch.distributed as dist

    layouts = {(dp, tp, pp): Layout(tuple(range(dp * tp * pp)), dp, tp, pp) for dp, tp, pp in LAYOUTS}
    ensure_groups(layouts.values())
    rank = dist.get_rank()
    full_lm, full_value = _full(dirs["lm"]), _full(dirs["value"])
    written = []
    for key, lay in layouts.items():
        if rank not in lay.ranks:
            continue
        model = ck.load_checkpoint(dirs["lm"], lay)
        assert model.shards(), f"{key}: rank {rank} holds nothing"
        for name, shard in model.shards().items():
            assert torch.equal(shard, full_lm[name][model.slices(name)]), (key, name)
        for name, shard in ck.init_random(CONFIG, lay, seed=1).shards().items():
            assert torch.equal(shard, model.shards()[name]), (key, name)
        sharded = ck.load_checkpoint(dirs["sharded"], lay)
        for name, shard in sharded.shards().items():
            assert torch.equal(shard, full_lm[name][model.slices(name)]), (key, "index", name)
        out = ck.save_checkpoint(model, out_root / f"lm_{key[0]}{key[1]}{key[2]}")
        if key == (1, 2, 2):
            ck.save_checkpoint(model, out_root / "lm_in_parts", max_shard_bytes=20_000)
        value = ck.load_checkpoint(dirs["value"], lay)
        assert value.head == "value"
        for name, shard in value.shards().items():
            assert torch.equal(shard, full_value[name][value.slices(name)]), (key, name)
        out_value = ck.save_checkpoint(value, out_root / f"value_{key[0]}{key[1]}{key[2]}")
        # a critic started from a causal LM: backbone from the file, value head from the seed
        critic = ck.load_checkpoint(dirs["lm"], lay, head="value", seed=6)
        for name, shard in critic.shards().items():
            want = (ck.random_tensor(name, tuple(full_value[name].shape), 6, CONFIG["initializer_range"])
                    if name.startswith("score.") else full_lm[name])
            assert torch.equal(shard, want[critic.slices(name)]), (key, "critic", name)
        assert (out is not None) == (out_value is not None) == (rank == lay.ranks[0])
        if out is not None:
            written.append((key, str(out), str(out_value)))
    return written


def test_checkpoint_roundtrip_through_every_layout(tmp_path):
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    dirs = {
        "lm": ck.write_random_checkpoint(tmp_path / "lm", CONFIG, seed=1),
        "value": ck.write_random_checkpoint(tmp_path / "value", CONFIG, seed=2, head="value"),
    }
    reference = LlamaForCausalLM.from_pretrained(dirs["lm"], torch_dtype=torch.float32).eval()
    dirs["sharded"] = tmp_path / "sharded"
    reference.save_pretrained(dirs["sharded"], max_shard_size="20KB")
    assert (dirs["sharded"] / "model.safetensors.index.json").exists()
    written = spawn(_roundtrip, 4, dirs, tmp_path)
    assert sorted(k for k, _, _ in written[0]) == sorted(LAYOUTS)  # rank 0 writes for every layout
    assert all(not w for w in written[1:])

    ids = torch.tensor([[3, 14, 15, 9, 26, 5]])
    with torch.no_grad():
        want_logits = reference(ids).logits
    original = {"lm": _full(dirs["lm"]), "value": _full(dirs["value"])}
    parts = tmp_path / "lm_in_parts"
    index = json.loads((parts / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2 and set(index) == set(original["lm"])
    in_parts = _full(parts)
    assert all(torch.equal(in_parts[n], original["lm"][n]) for n in original["lm"])
    with torch.no_grad():
        assert torch.equal(LlamaForCausalLM.from_pretrained(parts).eval()(ids).logits, want_logits)
    config = json.loads((dirs["lm"] / "config.json").read_text())
    for key, lm_out, value_out in written[0]:
        for kind, out in (("lm", lm_out), ("value", value_out)):
            saved = _full(Path(out))
            assert saved.keys() == original[kind].keys(), (key, kind)
            for name in saved:
                assert torch.equal(saved[name], original[kind][name]), (key, kind, name)
        assert json.loads(open(f"{lm_out}/config.json").read()) == config
        again = LlamaForCausalLM.from_pretrained(lm_out, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(again(ids).logits, want_logits), key
        value_model = LlamaForTokenClassification.from_pretrained(value_out, torch_dtype=torch.float32)
        assert value_model.score.weight.shape == (1, CONFIG["hidden_size"])
        assert torch.equal(value_model.score.weight.detach(), original["value"]["score.weight"])
