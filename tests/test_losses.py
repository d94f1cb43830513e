"""The stage losses against numbers worked out by hand (no Ray, no models).

softplus(-x) = -log σ(x) = log(1 + e^-x):  x=1 -> 0.3132617, x=0 -> log 2 = 0.6931472,
x=2 -> 0.1269280, x=1/3 -> 0.5403056, x=0.1 -> 0.6443967.
"""

import math

import pytest
import torch

from rlhf_cluster.lib.losses import (
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    dpo_metrics,
    margin_loss,
    ranking_loss,
    reward_metrics,
    sequence_logprobs,
    sft_loss,
)

T = torch.tensor


def test_bradley_terry_hand_values():
    assert bradley_terry_loss(T([1.0]), T([0.0])).item() == pytest.approx(0.3132617, abs=1e-6)
    assert bradley_terry_loss(T([0.0]), T([0.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    # batch mean of the two
    assert bradley_terry_loss(T([1.0, 0.0]), T([0.0, 0.0])).item() == pytest.approx(0.5032044, abs=1e-6)
    # a wrongly ordered pair costs more than a right one
    assert bradley_terry_loss(T([0.0]), T([1.0])).item() == pytest.approx(1.3132617, abs=1e-6)


def test_margin_loss_hand_values():
    # -log σ(1 - 0 - m): m=0 is Bradley–Terry, m=1 gives log 2, m=2/3 ("better") gives log(1+e^(-1/3))
    assert margin_loss(T([1.0]), T([0.0]), T([0.0])).item() == pytest.approx(0.3132617, abs=1e-6)
    assert margin_loss(T([1.0]), T([0.0]), T([1.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    assert margin_loss(T([1.0]), T([0.0]), T([2 / 3])).item() == pytest.approx(0.5403056, abs=1e-6)


def test_ranking_loss_hand_values():
    # edited=2 > chosen=1 > rejected=0: pairs (e,c) d=1, (e,r) d=2, (c,r) d=1
    # 0.3132617 + 0.1269280 + 0.3132617 = 0.7534514
    full = ranking_loss(T([[2.0, 1.0, 0.0]]), T([[1.0, 1.0, 1.0]]))
    assert full.item() == pytest.approx(0.7534514, abs=1e-6)
    # no edited response: only (c, r) counts, whatever the placeholder value
    only_pair = ranking_loss(T([[123.0, 1.0, 0.0]]), T([[0.0, 1.0, 1.0]]))
    assert only_pair.item() == pytest.approx(0.3132617, abs=1e-6)
    # mean over prompts: (0.7534514 + 0.3132617) / 2
    both = ranking_loss(T([[2.0, 1.0, 0.0], [9.0, 1.0, 0.0]]), T([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]))
    assert both.item() == pytest.approx(0.5333565, abs=1e-6)
    # with two responses it is Bradley–Terry
    assert ranking_loss(T([[1.0, 0.0]]), T([[1.0, 1.0]])).item() == pytest.approx(0.3132617, abs=1e-6)


def test_reward_metrics_counts_ties_as_wrong():
    m = reward_metrics(T([1.0, 0.0, 2.0]), T([0.0, 1.0, 2.0]))
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["margin"] == pytest.approx(0.0)


def _two_token_logits(batch: int, length: int) -> torch.Tensor:
    """Logits [0, ln 3] everywhere: p(token 0) = 1/4, p(token 1) = 3/4."""
    return torch.tensor([0.0, math.log(3.0)]).expand(batch, length, 2).clone()


def test_sft_loss_only_counts_response_tokens():
    # ids 0 1 | 0 1 : prompt of 2 tokens, response of 2. Predicted response tokens are
    # x2 = 0 (p=1/4) and x3 = 1 (p=3/4): loss = -(ln 1/4 + ln 3/4) / 2 = 0.8369882
    ids = T([[0, 1, 0, 1]])
    mask = T([[0, 0, 1, 1]])
    logits = _two_token_logits(1, 4)
    assert sft_loss(logits, ids, mask).item() == pytest.approx(0.8369882, abs=1e-6)
    # changing what the model predicts for prompt tokens changes nothing
    logits[0, 0] = T([5.0, -5.0])
    assert sft_loss(logits, ids, mask).item() == pytest.approx(0.8369882, abs=1e-6)
    # token-mean over the batch: a second row with one response token x=1 (ln 3/4)
    ids2, mask2 = T([[0, 1, 0, 1], [0, 0, 1, 2]]), T([[0, 0, 1, 1], [0, 0, 1, 0]])
    expected = -(math.log(0.25) + 2 * math.log(0.75)) / 3
    assert sft_loss(_two_token_logits(2, 4), ids2.clamp(max=1), mask2).item() == pytest.approx(expected, abs=1e-6)


def test_sequence_logprobs_sums_response_tokens():
    ids, mask = T([[0, 1, 0, 1]]), T([[0, 0, 1, 1]])
    expected = math.log(0.25) + math.log(0.75)
    assert sequence_logprobs(_two_token_logits(1, 4), ids, mask).item() == pytest.approx(expected, abs=1e-6)


def test_dpo_losses_hand_values():
    # h = (π_c - ref_c) - (π_r - ref_r) = (-1 + 1.5) - (-2 + 1.5) = 1
    args = (T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]))
    assert dpo_loss(*args, beta=0.1).item() == pytest.approx(0.6443967, abs=1e-6)  # log(1 + e^-0.1)
    assert dpo_loss(*args, beta=0.1, kind="ipo").item() == pytest.approx(16.0, abs=1e-5)  # (1 - 1/0.2)^2
    assert dpo_loss(*args, beta=0.5, kind="ipo").item() == pytest.approx(0.0, abs=1e-6)  # h hits 1/(2β) = 1
    # at the reference (h = 0) the sigmoid loss is log 2
    assert dpo_loss(T([-1.0]), T([-2.0]), T([-1.0]), T([-2.0]), beta=0.1).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(*args, beta=0.1, kind="hinge")


def test_chosen_nll_hand_values():
    # chosen log-probs -2 over 4 tokens and -6 over 3 tokens: per-token NLL 0.5 and 2, mean 1.25
    pi_c = T([-2.0, -6.0], requires_grad=True)
    loss = chosen_nll(pi_c, T([4, 3]))
    assert loss.item() == pytest.approx(1.25, abs=1e-6)
    loss.backward()  # d/dπ_c = -1 / (|c| · B): raising the chosen likelihood lowers the loss
    assert pi_c.grad.tolist() == pytest.approx([-1 / 8, -1 / 6], abs=1e-6)
    # a response with no tokens counts as one (no division by zero)
    assert chosen_nll(T([0.0]), T([0])).item() == pytest.approx(0.0)
    # with the DPO loss as in the stage: at h = 0 with β 0.1, log 2 + 0.2 · 1.25
    both = dpo_loss(T([-2.0, -6.0]), T([-3.0, -1.0]), T([-2.0, -6.0]), T([-3.0, -1.0]), beta=0.1) \
        + 0.2 * chosen_nll(T([-2.0, -6.0]), T([4, 3]))
    assert both.item() == pytest.approx(math.log(2) + 0.25, abs=1e-6)


def test_dpo_metrics():
    m = dpo_metrics(T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0]), beta=0.1)
    # h = [(-1+1.5) - (-2+1.5), (-3+2) - (-1+2)] = [1, -2]: implicit margins β h = [0.1, -0.2]
    assert m["reward_accuracy"] == pytest.approx(0.5)
    assert m["reward_margin"] == pytest.approx(-0.05)
    assert m["logratio"] == pytest.approx((1.0 + -2.0) / 2)
