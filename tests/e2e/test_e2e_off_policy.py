"""An off-policy correction end to end: the generated program's train call recomputes
the pre-update log-probs (under dp = 2 here) and logs the importance weights; on a
synchronous run the sampler is the trained policy, so the weights are 1 and the losses
are the uncorrected run's."""

from __future__ import annotations

import pytest
from codegen_fixtures import split_plan
from test_e2e_run import generated, metrics, mixed_plan, run, untimed


def test_decoupled_ppo_on_policy_equals_plain_ppo(tmp_path):
    runs = {}
    for correction, chosen in (("none", split_plan), ("decoupled", mixed_plan)):
        (tmp_path / correction).mkdir()
        script = generated(tmp_path / correction, "ppo_epochs", plan=chosen,
                           edit=lambda text: text.replace("ppo_epochs = 2", f'off_policy = "{correction}"  ppo_epochs = 2'))
        done = run(script, tmp_path / correction / "out", "--steps", "2", "--save-every", "10")
        assert done.returncode == 0, done.stderr
        runs[correction] = untimed(metrics(tmp_path / correction / "out"))
    assert all("a_tr/is_weight" not in r for r in runs["none"])
    for plain, corrected in zip(runs["none"], runs["decoupled"], strict=True):
        assert corrected["a_tr/is_weight"] == pytest.approx(1.0, abs=1e-4) and corrected["a_tr/is_capped_frac"] == 0
        assert "c_tr/is_weight" not in corrected  # the critic reads no correction
        for k in ("a_tr/loss", "a_tr/policy_loss", "a_tr/clip_frac", "a_tr/approx_kl", "reward"):
            assert corrected[k] == pytest.approx(plain[k], rel=1e-3, abs=1e-6), k
