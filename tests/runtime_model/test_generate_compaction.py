"""Finished rows leave the generation batch every `EOS_CHECK_EVERY` steps: the sampled
tokens and log-probs equal those of a batch that keeps every row to the end, under
tp and pp and with any micro-batching (each row draws from its own random stream)."""

import torch

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime import generate as gen_mod
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import ensure_groups, spawn
from rlhfc_runtime.generate import SamplingParams, generate, left_pad

CONFIG = ck.tiny_config(num_hidden_layers=2, rope_theta=1000.0)
PROMPTS = [[5, 9, 3, 17, 22], [40, 32], [11, 12, 13], [7, 8, 9, 10, 11, 12], [3, 4], [30, 31, 2, 19]]
NEW = 24
LAYOUTS = [(1, 1, 1), (1, 2, 1), (1, 1, 2)]


def _params(eos):
    return SamplingParams(max_new_tokens=NEW, greedy=False, temperature=1.3, seed=4, total_rows=len(PROMPTS),
                          eos_token_id=eos, pad_token_id=0)


def _everywhere(path, eos):
    import torch.distributed as dist

    layouts = [Layout(tuple(range(dp * tp * pp)), dp, tp, pp) for dp, tp, pp in LAYOUTS]
    ensure_groups(layouts)
    ids, mask = left_pad(PROMPTS, 0)
    out = {}
    for lay in layouts:
        if dist.get_rank() not in lay.ranks:
            continue
        model = ck.load_checkpoint(path, lay)
        for n_micro in (1, 3):
            g = generate(model, ids, mask, _params(eos), n_micro=n_micro)
            out[(lay.tp, lay.pp, n_micro)] = (g.sequences, g.logprobs, g.response_mask)
    every, gen_mod.EOS_CHECK_EVERY = gen_mod.EOS_CHECK_EVERY, 10**6  # never compact, never stop early
    try:
        model = ck.load_checkpoint(path, layouts[0]) if dist.get_rank() == 0 else None
        ref = generate(model, ids, mask, _params(eos)) if model is not None else None
    finally:
        gen_mod.EOS_CHECK_EVERY = every
    return out, ref and (ref.sequences, ref.logprobs, ref.response_mask)


def test_compacted_generation_equals_the_full_batch(tmp_path):
    path = ck.write_random_checkpoint(tmp_path / "lm", CONFIG, seed=11)
    plain = spawn(_everywhere, 2, path, None)[0][1][0]
    # as EOS, a token one row samples early and others late or never: rows end apart
    counts = torch.bincount(plain[:, -NEW:-NEW + 4].flatten())
    eos = int(counts.argmax())
    outs = spawn(_everywhere, 2, path, eos)
    ref = outs[0][1]
    lengths = ref[2].sum(1)
    assert int(lengths.min()) < gen_mod.EOS_CHECK_EVERY < int(lengths.max()), lengths  # rows left mid-way
    for out, _ in outs:
        for key, (seqs, logps, resp) in out.items():
            width = ref[0].shape[1]
            assert seqs.shape[1] == width, key
            assert torch.equal(seqs, ref[0]) and torch.equal(resp, ref[2]), key
            assert torch.allclose(logps, ref[1], atol=1e-5), key
