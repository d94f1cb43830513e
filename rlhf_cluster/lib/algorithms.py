"""The math of post-training as small pure torch functions (no Ray, no DeepSpeed).

Actors call these; tests check them against hand-computed numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Token log-probs and the masked NLL live with the other objectives; the RL math builds on them.
from rlhf_cluster.lib.losses import logprobs_from_logits, masked_mean, masked_nll, sequence_token_logprobs  # noqa: F401


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) * z, per position."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_eps: float = 0.2, dual_clip: float | None = None,
                        loss_agg: str = "token", is_weights: torch.Tensor | None = None,
                        clip_eps_high: float | None = None, norm_length: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: -E[min(r A, clip(r, 1-eps, 1+eps_high) A)], r = pi/pi_old.

    The min makes the objective a pessimistic bound, so a step gains nothing by moving r outside [1-eps, 1+eps].
    clip_eps_high (DAPO's "clip-higher", Yu et al. 2025): a wider upper bound than the lower one lets
    the probability of unlikely tokens with positive advantage grow faster, against entropy collapse;
    None: symmetric.
    dual_clip = c > 1 (Ye et al. 2020): for A < 0 the objective is further bounded below, max(min(...), c A), so a
    huge ratio on a bad token cannot produce an unbounded loss. loss_agg: see aggregate().
    is_weights: per-token importance weights of off-policy samples (truncated_is_weights), constants
    multiplying each token's objective.
    Returns (loss, fraction of response tokens where the PPO clip was active, i.e. min picked the clipped term).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + (clip_eps if clip_eps_high is None else clip_eps_high)) * advantages
    objective = torch.min(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        objective = torch.where(advantages < 0, torch.max(objective, dual_clip * advantages), objective)
    if is_weights is not None:
        objective = objective * is_weights
    loss = -aggregate(objective, mask, loss_agg, norm_length)
    clip_frac = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_frac


def truncated_is_weights(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                         stale: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling for samples drawn by an older policy (asynchronous rollout; Yao et
    al. 2025, OpenRLHF's TIS): w_t = min(pi_old(y_t) / pi_behaviour(y_t), cap), where pi_old is the
    policy the PPO ratio starts from (recomputed by the trainer) and pi_behaviour the engine's weights
    that sampled y_t. The truncation bounds the variance a rare token could bring. Samples with
    `stale` False ([B] bool) are on-policy: weight exactly 1.
    Returns ([B, T] weights, 0 outside the mask; fraction of stale response tokens whose ratio was cut)."""
    ratio = torch.exp(logprobs - behaviour_logprobs)
    stale_tokens = stale[:, None].to(mask.dtype) * mask
    weights = torch.where(stale[:, None], torch.clamp(ratio, max=cap), torch.ones_like(ratio)) * mask
    cut = ((ratio > cap).to(mask.dtype) * stale_tokens).sum() / stale_tokens.sum().clamp(min=1.0)
    return weights, cut


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_eps: float = 0.2, loss_agg: str = "token",
                       norm_length: int | None = None) -> torch.Tensor:
    """0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), aggregated (see aggregate()).

    The max is the pessimistic choice, so the critic gains nothing by moving further than eps from V_old.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * aggregate(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, loss_agg, norm_length)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and masked statistics
# ---------------------------------------------------------------------------------------------------------------------

LOSS_AGG_MODES = ("token", "sequence", "sequence_sum", "sequence_sum_norm")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token",
              norm_length: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    "token":    sum_{b,t} m x / sum_{b,t} m  -- every response token of the batch weighs the same, so long
                responses dominate (PPO / InstructGPT, DAPO's token-level loss; the default).
    "sequence": mean_b [ sum_t m x / sum_t m ] -- every sequence weighs the same whatever its length (the
                original GRPO objective); sequences with no response token are left out of the outer mean.
    "sequence_sum": mean_b [ sum_t m x ] -- token sums: a long response's tokens weigh as much as a short one's,
                and the sequence as a whole more.
    "sequence_sum_norm": mean_b [ sum_t m x ] / norm_length -- Dr. GRPO (Liu et al. 2025): the token sum over a
                constant (the generation budget), so no length bias enters through the normaliser.
    The sequence modes average over sequences with at least one response token.
    """
    if mode == "token":
        return masked_mean(per_token, mask)
    mask = mask.to(per_token.dtype)
    has_tokens = (mask.sum(-1) > 0).to(per_token.dtype)
    if mode == "sequence":
        return masked_mean(masked_mean(per_token, mask, dim=-1), has_tokens)
    if mode == "sequence_sum":
        return masked_mean((per_token * mask).sum(-1), has_tokens)
    if mode == "sequence_sum_norm":
        if not norm_length or norm_length <= 0:
            raise ValueError(f"loss_agg sequence_sum_norm needs a positive norm_length, got {norm_length}")
        return masked_mean((per_token * mask).sum(-1), has_tokens) / norm_length
    raise ValueError(f"unknown loss_agg {mode!r}; expected one of {LOSS_AGG_MODES}")


def aggregation_units(mask: torch.Tensor, mode: str = "token") -> int:
    """How many units aggregate() averages over in `mask`: response tokens ("token") or sequences with at
    least one (the sequence modes). A mini-batch split into micro-batches weighs each micro-batch's loss by its
    units over the mini-batch's, so the step is the same however it is split (padded or packed)."""
    if mode == "token":
        return int(mask.sum().item())
    if mode in LOSS_AGG_MODES:
        return int((mask.sum(-1) > 0).sum().item())
    raise ValueError(f"unknown loss_agg {mode!r}; expected one of {LOSS_AGG_MODES}")


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x where mask is 1: sum m (x - mean)^2 / (n - 1) (Bessel-corrected) or / n.

    With fewer than 2 masked elements the unbiased estimate is undefined; we return the biased one (0 or less).
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    sq = (((x - mean) * mask) ** 2).sum()
    denom = n - 1 if (unbiased and n > 1) else n
    return sq / denom.clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening (x - mean) / sqrt(var + eps) over all masked elements of the batch.

    var is the UNBIASED (Bessel, n - 1) masked variance, as in TRL/OpenRLHF. shift_mean=False adds the mean back,
    i.e. only rescales (keeps the sign information of e.g. rewards). Padding (mask 0) comes back as 0.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask, unbiased=True) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 = perfect critic, 0 = no better than a constant, < 0 worse.

    Both variances use the same n, so biased vs unbiased cancels. NaN when Var[R] = 0 (undefined, as in SB3).
    """
    mask = mask.to(values.dtype)
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r <= 0:
        return torch.tensor(float("nan"), dtype=values.dtype)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_r


# ---------------------------------------------------------------------------------------------------------------------
# KL penalty and token-level rewards
# ---------------------------------------------------------------------------------------------------------------------

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (J. Schulman, "Approximating KL", 2020).

    With log r = log pi_ref - log pi (so E_pi[r] = 1):
      k1 = -log r = log pi - log pi_ref          unbiased, high variance, can be negative per token;
      k2 = 0.5 (log r)^2                         biased (exact to 2nd order), low variance, >= 0;
      k3 = (r - 1) - log r                       unbiased (E_pi[r - 1] = 0), low variance, >= 0 (GRPO's KL).
    Elementwise on [B, T]; the caller masks. No clamping: keep log r moderate (exp overflows past ~88 in fp32).
    """
    log_ratio = logprobs - ref_logprobs  # log pi - log pi_ref = -log r
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KL_KINDS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 per row [B, T] -> [B] (0 for an empty row)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.to(torch.long) * positions).argmax(-1)


def token_level_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, + the sequence score r_phi(x, y) at the last response token.

    The KL to the reference policy enters as a reward penalty (Ziegler et al. 2019, InstructGPT), so the critic and
    GAE see it; the reward model only scores the full response, hence it sits on the final token. Rows with an empty
    mask get no score. scores [B], kl/mask [B, T] -> [B, T], zero on padding.
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    has_tokens = (mask.sum(-1) > 0).to(kl.dtype)
    idx = last_token_index(mask).unsqueeze(-1)
    return rewards.scatter_add(-1, idx, (scores.to(kl.dtype) * has_tokens).unsqueeze(-1))


# ---------------------------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over right-padded responses [B, T].

    delta_t = r_t + gamma V_{t+1} - V_t  (V = 0 past the last real token: the episode ends there),
    A_t = delta_t + gamma lam A_{t+1},    returns R_t = A_t + V_t (the critic's TD(lambda) target).
    lam trades bias (lam=0: one-step TD) against variance (lam=1: Monte-Carlo return - V). Zero on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[-1]
    last = torch.zeros_like(values[..., 0])
    advs = []
    for t in reversed(range(T)):
        next_v = values[..., t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[..., t] + gamma * next_v - values[..., t]
        last = (delta + gamma * lam * last) * mask[..., t]
        advs.append(last)
    advantages = torch.stack(advs[::-1], dim=-1)
    return advantages, (advantages + values) * mask


def _check_groups(scores: torch.Tensor, group_size: int, min_size: int = 1) -> torch.Tensor:
    """View scores [B] as [B // k, k], with a clear error when B is not a multiple of k."""
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size}, got {group_size}")
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"batch of {tuple(scores.shape)} scores is not divisible into groups of {group_size}"
                         " (expected [B] with B a multiple of group_size, samples of a prompt contiguous)")
    return scores.view(-1, group_size)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence advantage [B] -> per-token [B, T], zero on padding."""
    return seq_adv.unsqueeze(-1) * mask.to(seq_adv.dtype)


def grpo_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale_by_std: bool = True) -> torch.Tensor:
    """GRPO (Shao et al. 2024, outcome supervision): A_i = (r_i - mean_g r) / (std_g r + eps), on every token.

    The group of k samples of the same prompt is the baseline, so no critic is needed; std is the UNBIASED (k - 1)
    group std (as torch.std, TRL, verl); a group with equal scores gets A = 0. Needs k >= 2.
    scale_by_std=False (Dr. GRPO, Liu et al. 2025): A_i = r_i - mean_g r; dividing by the group std weighs
    prompts that are nearly always solved (or failed) up, a difficulty bias.
    """
    g = _check_groups(scores.float(), group_size, min_size=2)
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return _broadcast(adv.reshape(-1), mask)


def rloo_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - (sum_g r - r_i) / (k - 1), on every token.

    The leave-one-out baseline is independent of sample i, so the estimator stays unbiased; equals
    k / (k - 1) (r_i - mean_g r). Needs k >= 2.
    """
    g = _check_groups(scores.float(), group_size, min_size=2)
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _broadcast((g - baseline).reshape(-1), mask)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): G_t = sum_{s>=t} gamma^{s-t} r_s, then whitened over ALL tokens of the batch.

    token_rewards already hold the per-token KL penalty and the score at the last token (token_level_rewards);
    the global (not per-group) whitening is the baseline and keeps the scale stable without a critic.
    """
    mask = mask.to(token_rewards.dtype)
    rewards = token_rewards * mask
    running = torch.zeros_like(rewards[..., 0])
    rtg = []
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[..., t] + gamma * running) * mask[..., t]
        rtg.append(running)
    return whiten(torch.stack(rtg[::-1], dim=-1), mask)


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use: token rewards [B, T] (the KL penalty on every token, the score on the last), the
    response mask, the critic's values (None without a critic), the samples per prompt (contiguous) and options."""
    rewards: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None
    group_size: int
    gamma: float = 1.0
    lam: float = 0.95
    scale_by_std: bool = True


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: fn(inputs) -> (advantages [B, T], the critic's returns [B, T] or None), and what it
    needs from the run: a critic (the job starts one and trains it on the returns), groups of samples per prompt
    (samples_per_prompt >= 2; what dynamic sampling filters), and whether `whiten_advantages` applies."""
    fn: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
    needs_critic: bool = False
    needs_groups: bool = False
    whiten: bool = False


# `estimator:` in a PPO config names a row; adding an estimator is one function above and one row here.
ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(lambda x: gae(x.rewards, x.values * x.mask, x.mask, x.gamma, x.lam),
                     needs_critic=True, whiten=True),
    "grpo": Estimator(lambda x: (grpo_advantages(x.rewards.sum(-1), x.mask, x.group_size,
                                                 scale_by_std=x.scale_by_std), None), needs_groups=True),
    "rloo": Estimator(lambda x: (rloo_advantages(x.rewards.sum(-1), x.mask, x.group_size), None), needs_groups=True),
    "reinforce_pp": Estimator(lambda x: (reinforce_pp_advantages(x.rewards, x.mask, x.gamma), None)),
}


def estimator(name: str) -> Estimator:
    """The row `name`, or an error that lists the rows."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


# ---------------------------------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019)
# ---------------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant beta; update() is a no-op (kept so the coordinator can treat both controllers alike)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, sec. 2.2).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta (1 + e n_steps / horizon).
    KL above target raises the penalty, below lowers it; the clip bounds the change per update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restores beta; target/horizon stay as configured (a resumed run may change them on purpose)."""
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------------------------------
# Reward shaping
# ---------------------------------------------------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to the reward of each response of `lengths`:
    0 up to max_length - buffer tokens, then falling linearly to -factor at max_length:
    -factor * (length - (max_length - buffer)) / buffer, and -factor beyond max_length."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in 1..max_length ({max_length}), got {buffer}")
    over = (lengths.float() - (max_length - buffer)).clamp(min=0.0) / buffer
    return -factor * over.clamp(max=1.0)


def informative_groups(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """DAPO's dynamic sampling filter: [B // k] True for prompt groups whose rewards are not all equal.
    A group where every sample scored the same has zero advantage under GRPO / RLOO: no gradient, only noise
    in the batch size."""
    g = _check_groups(scores.float(), group_size, min_size=2)
    return (g.max(-1).values - g.min(-1).values) > eps


def clip_rewards(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """clamp(scores, -clip, clip): bounds outliers of the reward model (None or <= 0: unchanged)."""
    if clip is None or clip <= 0:
        return scores
    return scores.clamp(-clip, clip)


class RunningMeanStd:
    """Running mean and (population) variance over all elements seen, for reward normalisation.

    Parallel/Welford merge (Chan et al. 1979) of a batch (mean_b, var_b, n_b) into (mean, var, n), with
    delta = mean_b - mean:
      mean' = mean + delta n_b / N,  var' = (var n + var_b n_b + delta^2 n n_b / N) / N,  N = n + n_b,
    which equals mean/var of the concatenation exactly. Kept in float64 Python floats.
    """

    def __init__(self, eps: float = 1e-8):
        self.mean, self.var, self.count, self.eps = 0.0, 1.0, 0, eps

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.detach().double()
        x = x.reshape(-1) if mask is None else x[mask.bool()]
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b, var_b = x.mean().item(), x.var(unbiased=False).item()
        if self.count == 0:
            self.mean, self.var, self.count = mean_b, var_b, n_b
            return
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.var = (self.var * self.count + var_b * n_b + delta**2 * self.count * n_b / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.var + self.eps) ** 0.5

    def normalize(self, x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """(x - mean) / std, or x / std with shift_mean=False (scale only)."""
        return ((x - self.mean) if shift_mean else x) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


# ---------------------------------------------------------------------------------------------------------------------
# Extra loss terms
# ---------------------------------------------------------------------------------------------------------------------


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, coef: float,
            loss_agg: str = "token", norm_length: int | None = None) -> torch.Tensor:
    """GRPO's KL term (Shao et al. 2024): coef x the aggregated k3 estimate of KL(pi || pi_ref), added to the policy
    loss instead of shaping the reward (`kl_mode: loss`; TRL's beta, veRL's use_kl_loss). Kept out of the reward,
    the KL cannot become the advantage of a group whose scores are all equal, which group normalisation would
    scale up to unit size."""
    return coef * aggregate(kl_estimate(logprobs, ref_logprobs, "k3"), mask, loss_agg, norm_length)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float, loss_agg: str = "token",
                  norm_length: int | None = None) -> torch.Tensor:
    """-coef * aggregated entropy: added to the loss, it rewards keeping the policy stochastic (exploration)."""
    return -coef * aggregate(entropy, mask, loss_agg, norm_length)


def ptx_loss(logprobs: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """PPO-ptx (InstructGPT): coef * NLL of pretraining/SFT tokens, i.e. -gamma E[log pi(x)] added to the PPO loss
    to limit the "alignment tax" on the original distribution."""
    return coef * masked_nll(logprobs, mask)


# ---------------------------------------------------------------------------------------------------------------------
# Combining reward models, and rejection sampling
# ---------------------------------------------------------------------------------------------------------------------


def llama2_combined_reward(helpfulness: torch.Tensor, safety: torch.Tensor, unsafe_prompt: torch.Tensor,
                           threshold: float) -> torch.Tensor:
    """Llama 2's rule: the safety score where the prompt is flagged unsafe or the safety score is
    below `threshold` (the response may be unsafe), else the helpfulness score."""
    use_safety = unsafe_prompt.bool() | (safety < threshold)
    return torch.where(use_safety, safety, helpfulness)


def weighted_reward(scores: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_m w_m * r_m over the reward models."""
    missing = set(weights) - set(scores)
    if missing:
        raise ValueError(f"no scores for reward model(s) {sorted(missing)}")
    return sum(w * scores[name] for name, w in weights.items())


def best_of_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Index (into the flat batch) of the highest-scoring sample of each group of k; [B] -> [B/k]."""
    if scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores are not groups of k={k}")
    return scores.view(-1, k).argmax(-1) + torch.arange(0, scores.numel(), k)
