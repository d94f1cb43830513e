"""rlhf_cluster.lib.algorithms against numbers worked out by hand (in the comments), plus masking invariance.

Pure torch on CPU, no Ray: the whole file runs in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cluster.lib import algorithms as A

LN2 = math.log(2.0)


def t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), t(expected), atol=atol, rtol=0)


# Two right-padded sequences: lengths 3 and 2.
MASK = t([[1, 1, 1], [1, 1, 0]])


def garble(x: torch.Tensor, mask: torch.Tensor, value: float = 123.0) -> torch.Tensor:
    """x with every padded (mask 0) position overwritten by junk."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ------------------------------------------------------------------------------------------------ aggregation / stats


def test_aggregate_token_vs_sequence():
    x = t([[1, 2, 3], [10, 0, 0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # token: (1 + 2 + 3 + 10) / 4 = 4
    close(A.aggregate(x, mask, "token"), 4.0)
    # sequence: mean(2, 10) = 6
    close(A.aggregate(x, mask, "sequence"), 6.0)
    # an empty row is left out of the sequence mean: still 6, not (2 + 10 + 0) / 3
    close(A.aggregate(torch.cat([x, t([[5, 5, 5]])]), torch.cat([mask, t([[0, 0, 0]])]), "sequence"), 6.0)
    # padding does not matter
    close(A.aggregate(garble(x, mask), mask, "sequence"), 6.0)
    with pytest.raises(ValueError, match="bogus"):
        A.aggregate(x, mask, "bogus")


def test_micro_batch_weights_make_the_split_irrelevant():
    """Micro-batch losses weighted by aggregation_units over the whole give aggregate() of the whole."""
    x = t([[1, 2, 3], [10, 0, 0], [4, 4, 0]])
    mask = t([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert A.aggregation_units(mask, "token") == 6 and A.aggregation_units(mask, "sequence") == 3
    assert A.aggregation_units(t([[0, 0], [1, 0]]), "sequence") == 1  # an empty row is no unit
    for mode in ("token", "sequence"):
        parts = [(x[:1], mask[:1]), (x[1:], mask[1:])]  # token: 6/3 and 18/3 -> (2*3 + 6*3)/6 = 4
        total = A.aggregation_units(mask, mode)
        split = sum(A.aggregate(a, m, mode) * A.aggregation_units(m, mode) / total for a, m in parts)
        close(split, A.aggregate(x, mask, mode))
    close(A.aggregate(x, mask, "token"), 4.0)  # (6 + 10 + 8) / 6


def test_whiten_unbiased_and_shift_mean():
    x = t([[1, 2, 99], [3, 4, -5]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    # masked values 1,2,3,4: mean 2.5, unbiased var (2.25+0.25+0.25+2.25)/3 = 5/3, std = 1.290994
    # (1-2.5)/1.290994 = -1.161895, (2-2.5)/1.290994 = -0.387298
    expected = [[-1.161895, -0.387298, 0.0], [0.387298, 1.161895, 0.0]]
    close(A.whiten(x, mask), expected)
    # shift_mean=False adds the mean 2.5 back on real tokens
    close(A.whiten(x, mask, shift_mean=False), [[1.338105, 2.112702, 0.0], [2.887298, 3.661895, 0.0]])
    close(A.whiten(garble(x, mask, -1e4), mask), expected)


def test_masked_var():
    x = t([[1, 2, 50], [3, 4, 50]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    close(A.masked_var(x, mask), 5 / 3)  # sum sq dev 5 over n-1 = 3
    close(A.masked_var(x, mask, unbiased=False), 1.25)  # 5 / 4


def test_explained_variance():
    r = t([[1, 2, 3], [4, 5, 0]])
    mask = MASK
    # perfect critic -> 1
    close(A.explained_variance(r, r, mask), 1.0)
    # constant critic -> Var[R - c] = Var[R] -> 0
    close(A.explained_variance(torch.full_like(r, 7.0), r, mask), 0.0)
    # R = 1,2,3 ; V = 1,2,2 -> R - V = 0,0,1: var = 2/9 ; Var[R] = 2/3 -> 1 - 1/3 = 2/3
    r1, v1, m1 = t([[1, 2, 3]]), t([[1, 2, 2]]), t([[1, 1, 1]])
    close(A.explained_variance(v1, r1, m1), 2 / 3)
    # padding ignored
    close(A.explained_variance(garble(v1.expand(2, 3).clone(), t([[1, 1, 1], [0, 0, 0]])), r1.expand(2, 3),
                               t([[1, 1, 1], [0, 0, 0]])), 2 / 3)
    # constant returns: undefined
    assert math.isnan(A.explained_variance(v1, torch.ones_like(r1), m1).item())


# ------------------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_at_ratio_two():
    # r = pi_ref / pi = 2  <=>  ref - logp = ln 2
    logp, ref = t([[0.0]]), t([[LN2]])
    close(A.kl_estimate(logp, ref, "k1"), [[-LN2]])  # log pi - log pi_ref = -0.693147
    close(A.kl_estimate(logp, ref, "k2"), [[0.5 * LN2**2]])  # 0.5 * 0.480453 = 0.240227
    close(A.kl_estimate(logp, ref, "k3"), [[0.306853]])  # (2 - 1) - ln 2 = 0.306853
    # r = 1/2: k3 = (0.5 - 1) - ln 0.5 = -0.5 + 0.693147 = 0.193147 ; k1 = ln 2
    close(A.kl_estimate(t([[LN2]]), t([[0.0]]), "k3"), [[0.193147]])
    close(A.kl_estimate(t([[LN2]]), t([[0.0]]), "k1"), [[LN2]])
    # identical policies: all zero
    for kind in ("k1", "k2", "k3"):
        close(A.kl_estimate(t([[-1.3]]), t([[-1.3]]), kind), [[0.0]])
    with pytest.raises(ValueError, match="k9"):
        A.kl_estimate(logp, ref, "k9")


def test_kl_estimators_expectation_over_categorical():
    # pi = (1/2, 1/4, 1/4), ref = (1/4, 1/4, 1/2): KL(pi||ref) = 1/2 ln 2 + 0 + 1/4 ln(1/2) = 1/4 ln 2 = 0.173287
    pi, ref = t([0.5, 0.25, 0.25]), t([0.25, 0.25, 0.5])
    kl = 0.25 * LN2
    # k1 and k3 are unbiased: their exact expectation under pi (weights pi) is the KL
    for kind in ("k1", "k3"):
        close((pi * A.kl_estimate(pi.log(), ref.log(), kind)).sum(), kl)
    # k2 is biased: E = 1/2 (1/2 (ln2)^2) + 0 + 1/4 (1/2 (ln2)^2) = 3/8 (ln 2)^2 = 0.180170 != 0.173287
    close((pi * A.kl_estimate(pi.log(), ref.log(), "k2")).sum(), 3 / 8 * LN2**2)


def test_token_level_rewards():
    scores = t([1.0, -2.0])
    kl = t([[0.1, 0.2, 0.3], [0.5, -0.1, 7.0]])
    # -0.1 * kl on real tokens, + score at the last real token (t=2 for row 0, t=1 for row 1), 0 on padding:
    # row 0: -0.01, -0.02, -0.03 + 1 = 0.97 ; row 1: -0.05, 0.01 - 2 = -1.99, 0
    expected = [[-0.01, -0.02, 0.97], [-0.05, -1.99, 0.0]]
    close(A.token_level_rewards(scores, kl, MASK, 0.1), expected)
    close(A.token_level_rewards(scores, garble(kl, MASK), MASK.bool(), 0.1), expected)
    # an empty response gets no reward at all
    close(A.token_level_rewards(t([5.0]), t([[1.0, 1.0]]), t([[0, 0]]), 0.1), [[0.0, 0.0]])


# ----------------------------------------------------------------------------------------------------------- GAE


def test_gae_gamma1_lambda_half_with_padding():
    rewards = t([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])
    values = t([[0.5, 0.4, 0.6], [1.0, 0.5, 9.0]])
    # row 0 (length 3), gamma = 1, lam = 0.5, V_3 = 0:
    #   t=2: delta = 1 + 0 - 0.6 = 0.4                 A = 0.4
    #   t=1: delta = 0 + 0.6 - 0.4 = 0.2               A = 0.2 + 0.5 * 0.4 = 0.4
    #   t=0: delta = 0 + 0.4 - 0.5 = -0.1              A = -0.1 + 0.5 * 0.4 = 0.1
    #   returns = A + V = 0.6, 0.8, 1.0
    # row 1 (length 2; the 5.0 reward and 9.0 value are padding, so V_2 = 0):
    #   t=1: delta = 1.0 + 0 - 0.5 = 0.5               A = 0.5
    #   t=0: delta = 0.2 + 0.5 - 1.0 = -0.3            A = -0.3 + 0.5 * 0.5 = -0.05
    #   returns = 0.95, 1.0, 0
    adv, ret = A.gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    close(adv, [[0.1, 0.4, 0.4], [-0.05, 0.5, 0.0]])
    close(ret, [[0.6, 0.8, 1.0], [0.95, 1.0, 0.0]])
    adv2, ret2 = A.gae(garble(rewards, MASK, -7.0), garble(values, MASK, 42.0), MASK, gamma=1.0, lam=0.5)
    close(adv2, adv)
    close(ret2, ret)


def test_gae_lambda1_is_discounted_return_minus_value():
    # lam = 1 telescopes to A_t = G_t - V_t with G the discounted return; gamma = 0.9, rewards 0, 0, 1:
    # G = 0.81, 0.9, 1 ; V = 0.5, 0.4, 0.6 -> A = 0.31, 0.5, 0.4 and returns = G
    adv, ret = A.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.6]]), t([[1, 1, 1]]), gamma=0.9, lam=1.0)
    close(adv, [[0.31, 0.5, 0.4]])
    close(ret, [[0.81, 0.9, 1.0]])
    # lam = 0 is one-step TD: A_t = r_t + gamma V_{t+1} - V_t = 0.9*0.4-0.5, 0.9*0.6-0.4, 1-0.6
    adv, _ = A.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.6]]), t([[1, 1, 1]]), gamma=0.9, lam=0.0)
    close(adv, [[-0.14, 0.14, 0.4]])


# --------------------------------------------------------------------------------------------- critic-free advantages


def test_grpo_two_groups_of_two():
    scores = t([1.0, 0.0, 2.0, 2.0])
    mask = t([[1, 1], [1, 0], [1, 1], [0, 0]])
    # group 1: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.707107 -> +-0.5 / 0.707107 = +-0.707106
    # group 2: equal scores -> 0
    expected = [[0.707106, 0.707106], [-0.707106, 0.0], [0.0, 0.0], [0.0, 0.0]]
    close(A.grpo_advantages(scores, mask, group_size=2), expected)
    # one group of 3: 0, 1, 2 -> mean 1, unbiased std 1 -> -1, 0, 1
    close(A.grpo_advantages(t([0.0, 1.0, 2.0]), torch.ones(3, 1), group_size=3), [[-1.0], [0.0], [1.0]])


def test_rloo_group_of_three():
    scores = t([1.0, 2.0, 6.0])
    mask = t([[1, 1], [1, 0], [1, 1]])
    # baselines: (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> A = -3, -1.5, 4.5 (= 3/2 (r - mean 3))
    close(A.rloo_advantages(scores, mask, group_size=3), [[-3.0, -3.0], [-1.5, 0.0], [4.5, 4.5]])
    # two groups of two: A = r_i - r_other
    close(A.rloo_advantages(t([1.0, 4.0, 0.0, 0.0]), torch.ones(4, 1), 2), [[-3.0], [3.0], [0.0], [0.0]])


@pytest.mark.parametrize("fn", [A.grpo_advantages, A.rloo_advantages])
def test_group_validation(fn):
    with pytest.raises(ValueError, match="group"):
        fn(t([1.0, 2.0, 3.0]), torch.ones(3, 1), 2)  # 3 not divisible by 2
    with pytest.raises(ValueError, match="group_size"):
        fn(t([1.0, 2.0]), torch.ones(2, 1), 1)  # no baseline with k = 1


def test_reinforce_pp():
    rewards = t([[0.0, 0.0, 1.0], [0.5, 0.5, 3.0]])
    # gamma = 1, return-to-go: row 0: 1, 1, 1 ; row 1: 1, 0.5, (pad)
    # mean 0.9, unbiased var (4 * 0.01 + 0.16) / 4 = 0.05, std 0.223607
    # 0.1 / 0.223607 = 0.447214 ; -0.4 / 0.223607 = -1.788854
    expected = [[0.447214, 0.447214, 0.447214], [0.447214, -1.788854, 0.0]]
    close(A.reinforce_pp_advantages(rewards, MASK), expected)
    close(A.reinforce_pp_advantages(garble(rewards, MASK), MASK), expected)
    # gamma = 0.5: row 0: 0.25, 0.5, 1 ; row 1: 0.75, 0.5 ; mean 0.6
    # deviations -0.35, -0.1, 0.4, 0.15, -0.1 ; sq sum 0.325 ; var 0.325 / 4 = 0.08125 ; std 0.285044
    close(A.reinforce_pp_advantages(rewards, MASK, gamma=0.5),
          [[-1.227881, -0.350823, 1.403293], [0.526235, -0.350823, 0.0]])


def test_the_estimator_table_rows_are_the_functions_above():
    rewards = t([[0.0, -0.1, 1.0], [0.2, 0.3, 0.0], [0.0, 0.0, 2.0], [0.5, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    values = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [0.0, 0.1, 0.2], [0.3, 9.0, 9.0]])
    x = A.AdvantageInputs(rewards, mask, values, group_size=2, gamma=0.9, lam=0.8, scale_by_std=False)
    adv, ret = A.ESTIMATORS["gae"].fn(x)
    expected = A.gae(rewards, values * mask, mask, 0.9, 0.8)
    close(adv, expected[0].tolist())
    close(ret, expected[1].tolist())
    close(A.ESTIMATORS["grpo"].fn(x)[0], A.grpo_advantages(rewards.sum(-1), mask, 2, scale_by_std=False).tolist())
    close(A.ESTIMATORS["rloo"].fn(x)[0], A.rloo_advantages(rewards.sum(-1), mask, 2).tolist())
    close(A.ESTIMATORS["reinforce_pp"].fn(x)[0], A.reinforce_pp_advantages(rewards, mask, 0.9).tolist())
    assert [n for n, e in A.ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert [n for n, e in A.ESTIMATORS.items() if e.needs_groups] == ["grpo", "rloo"]
    assert all(e.fn(x)[1] is None for e in A.ESTIMATORS.values() if not e.needs_critic)
    with pytest.raises(ValueError, match="unknown advantage estimator 'gea'; expected one of gae, grpo, rloo"):
        A.estimator("gea")


# ------------------------------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller():
    c = A.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL = 2 * target: error = clip(1, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    c.update(12.0, 256)
    assert c.value == pytest.approx(0.100512)
    # KL = target / 2: error = clip(-0.5) = -0.2 -> 0.100512 * (1 - 0.00512) = 0.100001378...
    c.update(3.0, 256)
    assert c.value == pytest.approx(0.100512 * 0.99488)
    # inside the clip: KL = 6.6 -> error 0.1 -> x (1 + 0.1 * 100 / 10000) = x 1.001
    before = c.value
    c.update(6.6, 100)
    assert c.value == pytest.approx(before * 1.001)
    # checkpoint / resume
    d = A.AdaptiveKLController(0.5, target=6.0, horizon=10000)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    with pytest.raises(ValueError):
        A.AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_kl_controller():
    c = A.FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05
    d = A.FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


# ---------------------------------------------------------------------------------------------------- policy loss


def test_clipped_policy_loss_and_clip_fraction():
    ratios = t([[1.5, 0.5, 0.5, 1.0]])
    adv = t([[1.0, 1.0, -1.0, 2.0]])
    # eps 0.2: r A vs clip(r) A -> min, clip active?
    #   1.5 *  1 = 1.5  vs 1.2       -> 1.2   yes
    #   0.5 *  1 = 0.5  vs 0.8       -> 0.5   no
    #   0.5 * -1 = -0.5 vs -0.8      -> -0.8  yes
    #   1.0 *  2 = 2    vs 2         -> 2     no
    # loss = -(1.2 + 0.5 - 0.8 + 2) / 4 = -0.725 ; clip_frac = 2/4
    loss, frac = A.clipped_policy_loss(ratios.log(), torch.zeros(1, 4), adv, torch.ones(1, 4))
    close(loss, -0.725)
    close(frac, 0.5)


def test_truncated_is_weights_by_hand():
    # two samples of 3 tokens; sample 0 was sampled by older weights, sample 1 on-policy
    # ratios pi_old / pi_behaviour: sample 0 -> 0.5, 3.0 (cut at cap 2), 1.5 (masked out)
    old = t([[math.log(0.5), math.log(3.0), math.log(1.5)], [math.log(4.0), 0.0, 0.0]])
    behaviour = torch.zeros(2, 3)
    mask = t([[1, 1, 0], [1, 1, 1]])
    w, cut = A.truncated_is_weights(old, behaviour, mask, torch.tensor([True, False]), cap=2.0)
    close(w, [[0.5, 2.0, 0.0], [1.0, 1.0, 1.0]])  # on-policy sample: exactly 1 even where the ratio is 4
    close(cut, 0.5)  # 1 of sample 0's 2 response tokens was cut
    _, cut = A.truncated_is_weights(old, behaviour, mask, torch.tensor([False, False]), cap=2.0)
    close(cut, 0.0)  # nothing stale, nothing cut


def test_is_weights_scale_each_tokens_objective():
    # the loss of test_clipped_policy_loss_and_clip_fraction with weights 1, 0.5, 2, 0:
    # -(1.2 * 1 + 0.5 * 0.5 - 0.8 * 2 + 2 * 0) / 4 = 0.0375
    ratios, adv = t([[1.5, 0.5, 0.5, 1.0]]), t([[1.0, 1.0, -1.0, 2.0]])
    loss, frac = A.clipped_policy_loss(ratios.log(), torch.zeros(1, 4), adv, torch.ones(1, 4),
                                       is_weights=t([[1.0, 0.5, 2.0, 0.0]]))
    close(loss, 0.0375)
    close(frac, 0.5)  # the clip fraction does not depend on the weights
    plain, _ = A.clipped_policy_loss(ratios.log(), torch.zeros(1, 4), adv, torch.ones(1, 4))
    same, _ = A.clipped_policy_loss(ratios.log(), torch.zeros(1, 4), adv, torch.ones(1, 4),
                                    is_weights=torch.ones(1, 4))
    assert torch.equal(plain, same)  # weights of 1 change nothing, bit for bit


def test_dual_clip_negative_advantage_large_ratio():
    logp, old = t([[math.log(10.0), math.log(10.0)]]), t([[0.0, 0.0]])
    adv = t([[-1.0, 1.0]])
    mask = t([[1, 0]])
    # r = 10, A = -1: min(-10, -1.2) = -10 -> PPO loss 10 (unbounded in r)
    loss, frac = A.clipped_policy_loss(logp, old, adv, mask)
    close(loss, 10.0)
    close(frac, 0.0)  # the min picked the unclipped term
    # dual clip c = 3: max(-10, 3 * -1) = -3 -> loss 3
    loss, _ = A.clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    close(loss, 3.0)
    # A > 0 is unaffected: r = 10, A = 1 -> min(10, 1.2) = 1.2 -> loss -1.2 with or without dual clip
    pos = t([[1, 1]])
    for dc in (None, 3.0):
        close(A.clipped_policy_loss(logp, old, t([[1.0, 1.0]]), pos, dual_clip=dc)[0], -1.2)
    # r = 1 with A = -1: min = -1 > 3 * -1, dual clip inactive -> loss 1
    close(A.clipped_policy_loss(t([[0.0]]), t([[0.0]]), t([[-1.0]]), t([[1]]), dual_clip=3.0)[0], 1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        A.clipped_policy_loss(logp, old, adv, mask, dual_clip=0.5)


def test_policy_loss_aggregation_and_masking():
    # ratio 1 everywhere -> objective = A ; loss = -aggregate(A)
    adv = t([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    zeros = torch.zeros(2, 3)
    close(A.clipped_policy_loss(zeros, zeros, adv, mask)[0], -4.0)  # -(1+2+3+10)/4
    close(A.clipped_policy_loss(zeros, zeros, adv, mask, loss_agg="sequence")[0], -6.0)  # -(2 + 10)/2
    # junk under the mask (ratios, advantages) changes neither loss nor clip fraction
    logp = t([[0.1, -0.3, 0.05], [0.4, 0.0, 0.0]])
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ref = A.clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0, loss_agg="sequence")
    junk = A.clipped_policy_loss(garble(logp, mask, 5.0), garble(old, mask, -5.0), garble(adv, mask, -50.0), mask,
                                 dual_clip=3.0, loss_agg="sequence")
    close(junk[0], ref[0])
    close(junk[1], ref[1])


def test_clipped_value_loss():
    values = t([[1.5, 0.5], [1.1, 77.0]])
    old = t([[1.0, 1.0], [1.0, -77.0]])
    returns = t([[2.0, 0.4], [3.0, 0.0]])
    mask = t([[1, 1], [1, 0]])
    # eps 0.2:
    #   V 1.5, old 1.0, R 2.0: clipped V 1.2 ; max((-0.5)^2, (-0.8)^2) = 0.64
    #   V 0.5, old 1.0, R 0.4: clipped V 0.8 ; max(0.1^2, 0.4^2) = 0.16
    #   V 1.1, old 1.0, R 3.0: within the clip ; 1.9^2 = 3.61
    # token: 0.5 * (0.64 + 0.16 + 3.61) / 3 = 0.735 ; sequence: 0.5 * ((0.64 + 0.16)/2 + 3.61) / 2 = 1.0025
    close(A.clipped_value_loss(values, old, returns, mask), 0.735)
    close(A.clipped_value_loss(values, old, returns, mask, loss_agg="sequence"), 1.0025)
    close(A.clipped_value_loss(values, old, garble(returns, mask), mask), 0.735)


def test_kl_loss_is_the_aggregated_k3_times_its_coefficient():
    # token 1: r = 2 -> k3 0.306853; token 2: r = 1/2 -> k3 0.193147; token 3 identical -> 0; token 4 padding
    logp, ref = t([[0.0, LN2], [-1.0, 5.0]]), t([[LN2, 0.0], [-1.0, -9.0]])
    mask = t([[1, 1], [1, 0]])
    close(A.kl_loss(logp, ref, mask, 0.1), 0.1 * (0.306853 + 0.193147 + 0.0) / 3)  # token mean
    close(A.kl_loss(logp, ref, mask, 0.1, loss_agg="sequence"), 0.1 * (0.25 + 0.0) / 2)  # mean of sequence means
    close(A.kl_loss(logp, ref, mask, 0.1, loss_agg="sequence_sum_norm", norm_length=4), 0.1 * (0.5 + 0.0) / 2 / 4)
    close(A.kl_loss(garble(logp, mask), ref, mask, 0.1), 0.1 * 0.5 / 3)  # padding never counts
    # the gradient pushes log pi towards log pi_ref: d k3 / d logp = 1 - r
    lp = t([[0.0]]).requires_grad_()
    A.kl_loss(lp, t([[LN2]]), t([[1]]), 1.0).backward()
    close(lp.grad, [[1 - 2.0]])


def test_entropy_bonus_and_ptx_loss():
    ent = t([[1.0, 2.0], [3.0, 50.0]])
    mask = t([[1, 1], [1, 0]])
    close(A.entropy_bonus(ent, mask, 0.01), -0.02)  # -0.01 * (1+2+3)/3
    close(A.entropy_bonus(ent, mask, 0.01, loss_agg="sequence"), -0.0225)  # -0.01 * (1.5 + 3)/2
    logp = t([[-1.0, -2.0], [-3.0, -40.0]])
    close(A.ptx_loss(logp, mask, 0.5), 1.0)  # 0.5 * (1 + 2 + 3)/3
    close(A.ptx_loss(garble(logp, mask), mask, 0.5), 1.0)


# ---------------------------------------------------------------------------------------------------- reward shaping


def test_clip_rewards():
    close(A.clip_rewards(t([-5.0, 0.5, 7.0]), 1.0), [-1.0, 0.5, 1.0])
    close(A.clip_rewards(t([-5.0, 7.0]), None), [-5.0, 7.0])


def test_running_mean_std_matches_concatenation():
    rms = A.RunningMeanStd()
    rms.update(t([1.0, 2.0, 3.0]))
    rms.update(t([4.0, 10.0]))
    # concatenation 1, 2, 3, 4, 10: mean 4, population var (9 + 4 + 1 + 0 + 36) / 5 = 10
    assert rms.mean == pytest.approx(4.0)
    assert rms.var == pytest.approx(10.0)
    assert rms.count == 5
    close(rms.normalize(t([4.0, 14.0])), [0.0, 10 / math.sqrt(10)])  # (14 - 4)/sqrt(10) = 3.162278
    close(rms.normalize(t([10.0]), shift_mean=False), [10 / math.sqrt(10)])
    # masked update: only real tokens count -> same as above
    rms2 = A.RunningMeanStd()
    rms2.update(t([[1.0, 2.0, 3.0], [4.0, 10.0, 1e6]]), mask=MASK)
    assert (rms2.mean, rms2.var, rms2.count) == pytest.approx((4.0, 10.0, 5))
    # checkpoint / resume, then continue: add 5 -> 1,2,3,4,10,5: mean 25/6, var = E[x^2] - mean^2
    # E[x^2] = (1+4+9+16+100+25)/6 = 155/6 ; var = 155/6 - 625/36 = 305/36 = 8.472222
    rms3 = A.RunningMeanStd()
    rms3.load_state_dict(rms.state_dict())
    rms3.update(t([5.0]))
    assert rms3.mean == pytest.approx(25 / 6)
    assert rms3.var == pytest.approx(305 / 36)


def test_llama2_combination_rule_on_constructed_cases():
    from rlhf_cluster.lib.algorithms import llama2_combined_reward

    help_ = torch.tensor([0.9, 0.9, 0.9, 0.2])
    safe = torch.tensor([0.8, 0.1, 0.8, 0.9])
    unsafe_prompt = torch.tensor([False, False, True, False])
    # 0: safe prompt, safe response -> helpfulness; 1: safety below 0.15 -> safety;
    # 2: flagged prompt -> safety; 3: safe -> helpfulness
    assert llama2_combined_reward(help_, safe, unsafe_prompt, 0.15).tolist() == pytest.approx([0.9, 0.1, 0.8, 0.2])


def test_weighted_reward_and_best_of_k():
    from rlhf_cluster.lib.algorithms import best_of_k, weighted_reward

    s = {"h": torch.tensor([1.0, 2.0]), "s": torch.tensor([0.5, -1.0])}
    assert weighted_reward(s, {"h": 0.5, "s": 2.0}).tolist() == [1.5, -1.0]  # 0.5+1, 1-2
    with pytest.raises(ValueError, match=r"\['x'\]"):
        weighted_reward(s, {"x": 1.0})
    assert best_of_k(torch.tensor([0.1, 0.7, 0.3, 0.9, 0.2, 0.0]), 3).tolist() == [1, 3]
    with pytest.raises(ValueError, match="groups of k=4"):
        best_of_k(torch.zeros(6), 4)


# ---------------------------------------------------------------------------------------- DAPO-family stabilisers


def test_clip_higher_widens_only_the_upper_bound():
    # r = 1.25 (A = +1) and r = 0.7 (A = -1): with eps 0.2 both clipped: min(1.25, 1.2) = 1.2, min(-0.7, -0.8) = -0.8
    logp, old = t([[math.log(1.25), math.log(0.7)]]), t([[0.0, 0.0]])
    adv, mask = t([[1.0, -1.0]]), t([[1, 1]])
    close(A.clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)[0], -(1.2 - 0.8) / 2)
    # clip-higher 0.28: the upper bound is 1.28, so r = 1.25 passes unclipped; the lower bound stays 0.8
    loss, frac = A.clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    close(loss, -(1.25 - 0.8) / 2)
    close(frac, 0.5)  # only the A < 0 token is clipped


def test_sequence_sum_aggregations():
    x = t([[1, 2, 3], [10, 0, 0], [7, 7, 7]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last sequence has no response token
    close(A.aggregate(x, mask, "sequence_sum"), 8.0)  # mean(6, 10), empty row left out
    close(A.aggregate(x, mask, "sequence_sum_norm", norm_length=4), 2.0)  # (6 + 10) / 2 / 4
    with pytest.raises(ValueError, match="norm_length"):
        A.aggregate(x, mask, "sequence_sum_norm")
    assert A.aggregation_units(mask, "sequence_sum_norm") == 2
    # Dr. GRPO through the policy loss: ratio 1 -> -(sum of A per sequence) / L, mean over sequences
    zeros = torch.zeros(3, 3)
    close(A.clipped_policy_loss(zeros, zeros, x, mask, loss_agg="sequence_sum_norm", norm_length=4)[0], -2.0)


def test_grpo_without_std_scaling():
    # groups (1, 3) and (5, 5): centred -> (-1, 1), (0, 0); with std scaling (std of (1, 3) = sqrt(2)) -> -/+0.7071
    scores, mask = t([1.0, 3.0, 5.0, 5.0]), torch.ones(4, 2)
    close(A.grpo_advantages(scores, mask, 2, scale_by_std=False)[:, 0], t([-1.0, 1.0, 0.0, 0.0]))
    close(A.grpo_advantages(scores, mask, 2)[:, 0], t([-0.707106, 0.707106, 0.0, 0.0]), atol=1e-4)


def test_overlong_penalty():
    # budget 20, buffer 8: no penalty up to 12 tokens, then -(len - 12) / 8, -1 at 20 and beyond (x factor)
    lengths = torch.tensor([5, 12, 14, 16, 20, 25])
    close(A.overlong_penalty(lengths, 20, 8), t([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    close(A.overlong_penalty(lengths, 20, 8, factor=0.5), t([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError, match="buffer"):
        A.overlong_penalty(lengths, 20, 0)


def test_informative_groups():
    scores = t([1.0, 1.0, 0.0, 1.0, 0.5, 0.5 + 1e-9, 0.0, 0.0])
    assert A.informative_groups(scores, 2).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="groups of 3"):
        A.informative_groups(scores, 3)
