"""Checkpoints and exports at 70B, on paper: Llama 3.1 70B on a simulated 128-rank
layout (tp = 8, pp = 16), saved, resumed under another 128-rank layout (dp = 2, tp = 4,
pp = 16) and exported. The plans are pure functions of the shapes and layouts
(`shard_plan`), so every rank's bytes are counted without 128 processes; and the save and
restore code itself (`shard_io`) runs for sampled ranks on a meta-device model, every
tensor it makes counted, to check that the plans are what the code does."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfc.frontend.presets import PRESETS
from rlhfc_runtime import shard_io
from rlhfc_runtime.contract.family import shape_from_hf
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.contract.shapes import param_table
from rlhfc_runtime.dist import rank_groups
from rlhfc_runtime.model import ModelConfig, ShardedDecoder
from rlhfc_runtime.shard_plan import MissingInterval, export_plan, read_plan, volume, write_plan

CONFIG_70B = dict(model_type="llama", num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                  num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, head_dim=128,
                  max_position_embeddings=131072, rope_parameters=dict(
                      rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192))
SAVED = Layout(tuple(range(128)), 1, 8, 16)
RESUMED = Layout(tuple(range(128)), 2, 4, 16)
FP32 = 4  # master weights and both Adam moments
GIB = 2**30


@pytest.fixture(scope="module")
def seventy():
    shape = shape_from_hf(CONFIG_70B)
    assert shape == PRESETS["llama-3.1-70b"]
    table = param_table(shape)
    assert 70e9 < sum(volume(tuple((0, n) for n in p.shape)) for p in table.values()) < 71e9
    plan = write_plan(table, shape.n_layers, SAVED)
    on_disk = [{"file": shard_io.shard_file("actor", r), "key": f"{kind}/{piece.name}", "name": piece.name,
                "box": [list(d) for d in piece.box]}
               for r, pieces in plan.items() for piece in pieces for kind in shard_io.KINDS]
    return shape, table, plan, on_disk


def _shares(table, n_layers, layout) -> dict[int, int]:
    """Elements of the model each rank holds under `layout`."""
    from rlhfc_runtime.shard_plan import holders

    out = dict.fromkeys(layout.ranks, 0)
    for boxes in holders(table, n_layers, layout).values():
        for box, ranks in boxes.items():
            for r in ranks:
                out[r] += volume(box)
    return out


def test_a_70b_save_writes_each_element_once_and_no_rank_more_than_its_share(seventy):
    shape, table, plan, _ = seventy
    total = sum(volume(tuple((0, n) for n in p.shape)) for p in table.values())
    share = _shares(table, shape.n_layers, SAVED)
    written = {r: sum(volume(p.box) for p in pieces) for r, pieces in plan.items()}
    assert sum(written.values()) == total  # each element once: nothing replicated twice on disk
    for r in SAVED.ranks:
        assert written[r] <= share[r]  # a rank writes only what it holds: no tensor crosses processes
        bucket = max((volume(p.box) for p in plan[r]), default=0)  # streamed: one tensor copied to host at a time
        assert bucket * FP32 < 0.6 * GIB, r
    assert max(share.values()) * 3 * FP32 < 8 * GIB  # the training state of a rank: 70B * 12 B / 128 is 6.6 GB


def test_a_70b_resume_under_another_layout_reads_exactly_its_share(seventy):
    shape, table, _, on_disk = seventy
    share = _shares(table, shape.n_layers, RESUMED)
    biggest_read = 0
    for r in RESUMED.ranks:
        for kind in shard_io.KINDS:
            reads = read_plan(on_disk, table, shape.n_layers, RESUMED, r, prefix=f"{kind}/")
            assert sum(volume(x.src) for x in reads) == share[r], (r, kind)  # every element once, nothing more
            biggest_read = max([biggest_read] + [volume(x.src) for x in reads])
    assert biggest_read * FP32 < 0.6 * GIB  # the one piece in flight on top of the rank's own shards


def test_a_70b_export_spreads_the_writers_and_holds_one_tensor_at_a_time(seventy):
    shape, table, _, _ = seventy
    plan = export_plan(shape, table, SAVED, 2, 5 * 10**9)
    total = sum(volume(tuple((0, n) for n in t.shape)) for t in plan) * 2
    largest = max(volume(tuple((0, n) for n in t.shape)) for t in plan) * 2
    assert largest == 128256 * 8192 * 2  # the embedding (and the untied lm_head)
    per_writer: dict[int, int] = {}
    for t in plan:
        per_writer[t.writer] = per_writer.get(t.writer, 0) + volume(tuple((0, n) for n in t.shape)) * 2
        assert sum(volume(s.box) for s in t.sources) == volume(tuple((0, n) for n in t.shape))  # every piece once
    assert len(per_writer) == 128 and max(per_writer.values()) <= total / 128 + largest
    assert len({t.file for t in plan}) >= 128  # one file (or more) per writer


@pytest.mark.parametrize("rank", [0, 7, 63, 127])
def test_the_save_and_restore_code_on_meta_tensors_allocates_a_share_plus_one_piece(seventy, monkeypatch, tmp_path, rank):
    """shard_io itself, for one rank of each layout, on a meta-device 70B stage: the
    tensors it writes are the rank's own parameters (one at a time), and a restore makes
    its moments (its share) plus one piece at a time."""
    shape, table, _, on_disk = seventy
    cfg = ModelConfig.from_hf(CONFIG_70B)
    written: list[int] = []

    class CountingFile:
        def __init__(self, path, order, metadata):
            self.intervals = json.loads(metadata["rlhfc_intervals"])

        def write(self, key, tensor):
            written.append(tensor.numel() * tensor.element_size())

        def close(self):
            pass

    monkeypatch.setattr(shard_io, "TensorFile", CountingFile)
    saved = ShardedDecoder(cfg, rank_groups(SAVED, rank), device="meta")
    own = sum(p.numel() * p.element_size() for p in saved.parameters())
    file, entries = shard_io.write_shards(tmp_path, "actor", saved, optimizer=None)
    assert sum(written) <= own and max(written) <= max(p.numel() for p in saved.parameters()) * FP32

    pieces: list[int] = []

    class MetaFile:  # safe_open of a shard file: slices as meta tensors of their shape
        def __init__(self, path, framework):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get_slice(self, key):
            class Slice:
                def __getitem__(self, sl):
                    t = torch.empty(tuple(s.stop - s.start for s in sl), device="meta")
                    pieces.append(t.numel() * t.element_size())
                    return t
            return Slice()

    monkeypatch.setattr(shard_io, "safe_open", MetaFile)
    resumed = ShardedDecoder(cfg, rank_groups(RESUMED, rank), device="meta")
    mine = sum(p.numel() for p in resumed.parameters())
    for kind in shard_io.KINDS:
        pieces.clear()
        out = shard_io.read_shards(tmp_path, on_disk, resumed, kind)
        assert sum(pieces) == mine * FP32  # exactly its share read, piece by piece
        assert max(pieces) * 1.0 < 0.6 * GIB
        assert sum(t.numel() for t in out.values()) == mine


def test_every_small_layout_pair_writes_each_element_once_and_reads_each_once():
    """Tiny Llama (and a value head) over every 1-8 rank layout the tp split allows:
    what one layout writes, every other reads back exactly (pure plans, element counts)."""
    from rlhfc_runtime.contract.kinds import Head

    shape = PRESETS["tiny"]
    layouts = [Layout(tuple(range(dp * tp * pp)), dp, tp, pp)
               for dp in (1, 2) for tp in (1, 2) for pp in (1, 2) if dp * tp * pp <= 8]
    for head in (Head.LM, Head.VALUE):
        table = param_table(shape, head)
        total = sum(volume(tuple((0, n) for n in p.shape)) for p in table.values())
        for src in layouts:
            plan = write_plan(table, shape.n_layers, src)
            assert sum(volume(p.box) for ps in plan.values() for p in ps) == total
            on_disk = [{"file": f"r{r}", "key": f"weight/{p.name}", "name": p.name, "box": p.box}
                       for r, ps in plan.items() for p in ps]
            for dst in layouts:
                share = _shares(table, shape.n_layers, dst)
                for r in dst.ranks:
                    reads = read_plan(on_disk, table, shape.n_layers, dst, r, prefix="weight/")
                    assert sum(volume(x.dst) for x in reads) == share[r], (src, dst, r)
    with pytest.raises(MissingInterval, match="needs"):  # a shard file's intervals gone: refused, not zeros
        read_plan(on_disk[1:], table, shape.n_layers, layouts[0], 0, prefix="weight/")
