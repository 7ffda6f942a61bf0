"""Every-family numerics at real vocabularies and head dims: 2 layers at reduced width, token
log-probs of a 2 x 384 batch against transformers on 1 process and at tp = 2 (2 processes).
Run: python bench/family_real_shapes.py. Timings here are not a comparison (workers run
one thread each and are not warmed up); see bench/results/family_real_shapes.md."""
import time, json, tempfile
from pathlib import Path
import torch
from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import ensure_groups, spawn

CASES = {
    "qwen3": ("qwen3", dict(vocab_size=151936, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, intermediate_size=3072, tie_word_embeddings=True)),
    "gemma2": ("gemma2", dict(vocab_size=256000, hidden_size=576, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=256, intermediate_size=1536, sliding_window=128, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, query_pre_attn_scalar=256)),
    "phi3": ("phi3", dict(vocab_size=32064, hidden_size=768, num_attention_heads=8, num_key_value_heads=8,
                          intermediate_size=2048, pad_token_id=0)),
}
B, T = 2, 384

def write(tmp):
    from transformers import AutoConfig, AutoModelForCausalLM
    dirs = {}
    for name, (mt, kw) in CASES.items():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(mt, num_hidden_layers=2, max_position_embeddings=4096, **kw)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp / name)
        dirs[name] = str(tmp / name)
    return dirs

def worker(dirs, refs):
    import torch.distributed as dist
    rank = dist.get_rank()
    one, tp2 = Layout((0,), 1, 1, 1), Layout((0, 1), 1, 2, 1)
    ensure_groups([one, tp2])
    out = {}
    for name, d in dirs.items():
        ids = refs[name]["ids"]
        res = {}
        for label, lay in (("tp1", one), ("tp2", tp2)):
            if rank not in lay.ranks:
                continue
            m = ck.load_checkpoint(d, lay)
            with torch.no_grad():
                t0 = time.perf_counter(); lp = m.token_logprobs(ids); dt = time.perf_counter() - t0
            res[label] = dict(max_abs=float((lp - refs[name]["lp"]).abs().max()), seconds=round(dt, 2))
            del m
        out[name] = res
    return out

if __name__ == "__main__":
    tmp = Path(tempfile.mkdtemp())
    dirs = write(tmp)
    from transformers import AutoModelForCausalLM
    refs = {}
    for name, d in dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ids = torch.randint(3, hf.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            t0 = time.perf_counter(); logits = hf(ids).logits; dt = time.perf_counter() - t0
        lp = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        refs[name] = dict(ids=ids, lp=lp, hf_seconds=round(dt, 2), spread=float(lp.std()))
        del hf, logits
    results = spawn(worker, 2, dirs, {n: {k: v for k, v in r.items() if k in ("ids", "lp")} for n, r in refs.items()})
    for name in CASES:
        print(json.dumps({"family": name, **{k: v for k, v in CASES[name][1].items() if k in ("vocab_size", "head_dim")},
                          "hf_seconds": refs[name]["hf_seconds"], "logprob_std": round(refs[name]["spread"], 3),
                          **results[0][name], "tp2_rank1": results[1][name].get("tp2")}))
