"""A trainable model's Adam state exists from the start (issue 22: the first step's
peak is the one the plan priced), and steps exactly as torch's lazily made state does."""

import pytest
import torch

from rlhfc_runtime import calls
from rlhfc_runtime.contract.program import ModelSpec


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_moments_exist_before_the_first_step_and_change_nothing(name):
    torch.manual_seed(0)
    eager_module, lazy_module = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    lazy_module.load_state_dict(eager_module.state_dict())
    settings = {"lr": 0.05, "weight_decay": 0.01, "eps": 1e-6}
    eager = calls._optimizer(eager_module, ModelSpec("llama", trainable=True, optimizer={"name": name, **settings}))
    lazy = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(lazy_module.parameters(), **settings)

    for p in eager_module.parameters():
        state = eager.state[p]
        assert float(state["step"]) == 0.0
        assert state["exp_avg"].shape == p.shape and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert not lazy.state  # torch's own makes them at the first step

    for _ in range(4):
        x = torch.randn(3, 6)
        for module, opt in ((eager_module, eager), (lazy_module, lazy)):
            opt.zero_grad()
            module(x).square().sum().backward()
            opt.step()
    for p, q in zip(eager_module.parameters(), lazy_module.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(eager.state[p]["exp_avg_sq"], lazy.state[q]["exp_avg_sq"])
    assert float(eager.state[eager_module.weight]["step"]) == 4.0


def test_frozen_models_have_no_optimizer():
    assert calls._optimizer(torch.nn.Linear(2, 2), ModelSpec("llama")) is None
