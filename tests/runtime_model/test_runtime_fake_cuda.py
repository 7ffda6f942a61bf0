"""Device discipline without a GPU: the model, generation, every interface's prepare and
loss, rule rewards and the engine's call path run on fake accelerator tensors
(`FakeTensorMode`), which raise FakeTensorDeviceMismatchError wherever a CPU tensor
meets a device tensor.

The fake device is "cuda" when torch is built with CUDA. A CPU-only torch cannot
record autograd or run Python indexing on fake CUDA tensors (both want a CUDA device
guard, and abort the process without one), so there the fake device is "meta": the
same mismatch checks against CPU tensors, with a device guard. Host syncs (bool /
item / tolist of a tensor) cannot see fake data: the tests stub them with fixed
values; collectives do not occur in a world of one (tp = pp = dp = 1)."""

from contextlib import contextmanager

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode

from rlhfc_runtime import calls
from rlhfc_runtime.algorithms.registry import REGISTRY, rule_scores
from rlhfc_runtime.checkpoint import tiny_config
from rlhfc_runtime.contract.interfaces import INTERFACES
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.contract.program import ModelSpec
from rlhfc_runtime.contract.shapes import ModelShape
from rlhfc_runtime.dist import rank_groups
from rlhfc_runtime.model import ModelConfig, ShardedDecoder, lm_loss

CFG = tiny_config(num_hidden_layers=2, vocab_size=48)
B, P, N = 4, 5, 3  # rows, prompt length, new tokens
T = P + N
ONE = Layout((0,), 1, 1, 1)
CUDA = torch.device("cuda", 0) if torch.backends.cuda.is_built() else torch.device("meta")


def _nested_zeros(shape):
    return 0 if not shape else [_nested_zeros(shape[1:]) for _ in range(shape[0])]


def _every_index(self):
    """`nonzero` of a tensor whose every element is taken to be nonzero."""
    grids = torch.meshgrid(*[torch.arange(n, device=self.device) for n in self.shape], indexing="ij")
    return torch.stack(grids, -1).reshape(-1, self.dim())


@contextmanager
def fake_cuda(monkeypatch):
    """Fake tensors; host syncs return fixed values (True, 1, zeros, every index
    nonzero); indexing by view ops (`_getitem`)."""
    monkeypatch.setattr(FakeTensor, "__bool__", lambda self: True, raising=False)
    monkeypatch.setattr(FakeTensor, "__int__", lambda self: 1, raising=False)
    monkeypatch.setattr(FakeTensor, "__float__", lambda self: 0.0, raising=False)
    monkeypatch.setattr(FakeTensor, "item", lambda self: 1, raising=False)
    monkeypatch.setattr(FakeTensor, "tolist", lambda self: _nested_zeros(tuple(self.shape)), raising=False)
    monkeypatch.setattr(FakeTensor, "nonzero", _every_index, raising=False)  # data-dependent: all true
    monkeypatch.setattr(calls, "device_for_rank", lambda: CUDA)
    with FakeTensorMode():
        yield


def _model(head="lm", dtype=torch.float32):
    return ShardedDecoder(ModelConfig.from_hf(CFG), rank_groups(ONE, 0), head, device=CUDA, dtype=dtype)


def _seq():
    ids = torch.full((B, T), 7, dtype=torch.long, device=CUDA)
    mask = torch.ones(B, T, dtype=torch.long, device=CUDA)
    response = torch.cat([torch.zeros(B, P, dtype=torch.long, device=CUDA),
                          torch.ones(B, N, dtype=torch.long, device=CUDA)], 1)
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response}


def _inputs(name):
    """Device-resident inputs of interface `name`, as the engine holds them."""
    seq = _seq()
    pairs = {k: torch.stack([v, v], 1) for k, v in seq.items()}
    per_token = lambda: torch.full((B, T), -1.0, device=CUDA)  # noqa: E731
    make = {"seq": lambda: seq, "data": lambda: seq, "prompts": lambda: seq, "pairs": lambda: pairs,
            "logp": per_token, "values": per_token, "score": lambda: torch.full((B,), 0.5, device=CUDA),
            "base_score": lambda: torch.full((B,), 0.5, device=CUDA),
            "ref_logp": (lambda: torch.full((B, 2), -3.0, device=CUDA)) if name == "dpo" else per_token}
    out = {}
    for key in INTERFACES[name].inputs:
        value = make[key]()
        out[key] = value if isinstance(value, dict) else {key: value}
    return out


def _settings(name, **extra):
    return {**INTERFACES[name].defaults(), "rows": B, "n_mbs": 2, "token_budget": 0, "recompute": False, "precision": "fp32", "group_size": 2,
            "step": 0, "steps": 1, "seed": 0, "eos_id": 2, "pad_id": 0, "max_new_tokens": N, **extra}


def _spec(head, trainable):
    return ModelSpec("llama", head=head, trainable=trainable, shape=ModelShape(
        vocab=CFG["vocab_size"], hidden=CFG["hidden_size"], intermediate=CFG["intermediate_size"],
        n_layers=CFG["num_hidden_layers"], n_heads=CFG["num_attention_heads"], n_kv_heads=CFG["num_key_value_heads"],
        max_positions=CFG["max_position_embeddings"], tied_embeddings=False))


def test_fake_cuda_catches_a_cpu_tensor(monkeypatch):
    """The harness itself: a CPU tensor meeting a CUDA one raises."""
    with fake_cuda(monkeypatch):
        with pytest.raises(FakeTensorDeviceMismatchError):
            torch.ones(2, device=CUDA) + torch.ones(2)


def test_model_forward_backward_logprobs_values_on_cuda(monkeypatch):
    with fake_cuda(monkeypatch):
        lm, critic = _model(), _model("value")
        seq = _seq()
        assert lm.forward(seq["input_ids"]).device == CUDA
        assert lm.token_logprobs(seq["input_ids"], seq["attention_mask"], n_micro=2).device == CUDA
        assert critic.values(seq["input_ids"], seq["attention_mask"]).device == CUDA
        # the padded path (explicit key mask) and both schedules with recompute
        hidden = lm.stage_forward(seq["input_ids"], torch.arange(T, device=CUDA).expand(B, T),
                                  seq["attention_mask"].bool())
        assert hidden.device == CUDA
        opt = torch.optim.Adam(lm.parameters(), lr=1e-3)
        for schedule in ("1f1b", "gpipe"):
            lm.train_step(seq["input_ids"], seq["attention_mask"], lm_loss, opt, n_micro=2, schedule=schedule,
                          recompute=True)
        assert all(p.grad.device == CUDA for p in lm.parameters())


def test_generation_on_cuda(monkeypatch):
    with fake_cuda(monkeypatch):
        lm = _model()
        prompts = {k: v[:, :P] for k, v in _seq().items() if k != "response_mask"}
        for using, group in (("generate", 2), ("generate_greedy", 1)):
            settings = _settings(using, group_size=group, rows=B * group)
            out, _ = calls.run_call("generate", using, calls.RuntimeModel(lm, None), _spec("lm", False),
                                    {"prompts": prompts}, REGISTRY[using].outputs, settings, rank_groups(ONE, 0))
            seq = out[REGISTRY[using].outputs[0]]
            assert seq["input_ids"].device == CUDA and seq["input_ids"].shape == (B * group, T)


def test_rule_scores_on_the_sequences_device(monkeypatch):
    with fake_cuda(monkeypatch):
        scores = rule_scores("pattern_reward", _seq(), N, 2)
        assert scores.device == CUDA
        out, _ = calls.run_call("inference", "rule", None, ModelSpec("rule", rule="length_reward"),
                                {"seq": _seq()}, ("score",), _settings("logprobs"), rank_groups(ONE, 0))
        assert out["score"]["score"].device == CUDA


@pytest.mark.parametrize("name", sorted(n for n, i in INTERFACES.items() if i.kind.value != "generate"))
def test_every_interface_runs_on_cuda(monkeypatch, name):
    """Inference compute, or train prepare + loss + backward + Adam, through run_call."""
    with fake_cuda(monkeypatch):
        iface = INTERFACES[name]
        head = iface.head.value if iface.head is not None else "lm"
        model = _model(head)
        trainable = iface.kind.value == "train"
        opt = torch.optim.Adam(model.parameters(), lr=1e-3) if trainable else None
        out, metrics = calls.run_call(iface.kind.value, name, calls.RuntimeModel(model, opt), _spec(head, trainable),
                                      _inputs(name), iface.outputs, _settings(name), rank_groups(ONE, 0))
        for key in iface.outputs:
            assert out[key][key].device == CUDA, key
        if trainable:
            assert "loss" in metrics
            assert all(p.grad.device == CUDA for p in model.parameters() if p.grad is not None)


def test_bf16_copies_and_master_weights_on_cuda(monkeypatch):
    """A frozen copy takes the call's precision; a trainable one keeps fp32 weights."""
    with fake_cuda(monkeypatch):
        frozen, trained = calls.RuntimeModel(_model(), None), calls.RuntimeModel(_model(), None)
        trained.optimizer = torch.optim.Adam(trained.module.parameters())
        for m in (frozen, trained):
            calls.set_precision(m, "bf16")
        assert {p.dtype for p in frozen.module.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in trained.module.parameters()} == {torch.float32}
        copy = calls.model_from_shards(_spec("lm", False), frozen.module.shards(), ONE, 0)
        assert copy.module.device == CUDA and {p.dtype for p in copy.module.parameters()} == {torch.bfloat16}

