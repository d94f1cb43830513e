"""Token log-probs and the training objectives of SFT, reward modelling and DPO, as small pure torch functions.

No Ray, no DeepSpeed: the stages call these inside their workers, tests check them
against hand-computed numbers. Every loss returns a scalar averaged over the batch.
The stages and actors take token log-probs from the hidden states a chunk at a time
(lib/logprobs.py); the logits forms here define the objectives, and are what the tests
hold that path to.

Notation: σ is the logistic sigmoid, r_c / r_r are reward-model scores of the chosen and
rejected responses, π_c / ref_c are summed response log-probs under the policy / reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) per position: logits [B, T, V], labels [B, T] -> [B, T]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1: logits [B, T, V], ids [B, T] -> [B, T-1]."""
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])


def sequence_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1 of right-padded sequences under `model`: [B, T] -> [B, T-1], from its
    hidden states a chunk of tokens at a time (lib/logprobs.py: no [B, T, vocab] logits)."""
    from rlhf_cluster.lib.logprobs import model_logprobs

    return model_logprobs(model, input_ids, attention_mask)[0]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1; an all-zero mask gives 0 (not NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the masked tokens, averaged over them: -Σ m log p / Σ m."""
    return -masked_mean(logprobs, mask)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked cross-entropy on response tokens only (Llama 2 SFT):

        L = -Σ_t m_t log p(x_t | x_<t) / Σ_t m_t,   t = 1..T-1,

    where `loss_mask` m is aligned with `input_ids` (1 on tokens the assistant wrote), so prompt
    tokens and padding contribute nothing. The mean is over response tokens of the whole batch.
    """
    return masked_nll(token_logprobs(logits, input_ids), loss_mask[:, 1:].float())


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log π(response | prompt) = Σ_t m_t log p(x_t | x_<t), one number per sequence: [B]."""
    return (token_logprobs(logits, input_ids) * loss_mask[:, 1:].float()).sum(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry pairwise loss (InstructGPT, Llama 2): L = -log σ(r_c - r_r) = softplus(r_r - r_c)."""
    return F.softplus(r_rejected - r_chosen).mean()


def margin_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Llama 2's margin variant: L = -log σ(r_c - r_r - m(strength)).

    A larger margin for more clearly preferred pairs asks for a larger score gap on them.
    """
    return F.softplus(r_rejected - r_chosen + margin).mean()


def ranking_loss(rewards: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Llama 3's ranking loss over responses ordered best first (edited > chosen > rejected):

        L = mean over prompts of Σ_{i<j, both present} -log σ(r_i - r_j)

    `rewards` [B, K] holds the K responses of each prompt best first; `present` [B, K] is 0 where a
    prompt lacks a response (e.g. no edited answer), and pairs touching it are left out. With K = 2
    it is the Bradley–Terry loss.
    """
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # [B, K, K]: r_i - r_j
    k = rewards.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
    pairs = upper & present.bool().unsqueeze(2) & present.bool().unsqueeze(1)
    return (F.softplus(-diff) * pairs).sum((1, 2)).mean()


def reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (fraction with r_c > r_r; ties count as wrong) and mean margin r_c - r_r."""
    return {"accuracy": (r_chosen > r_rejected).float().mean().item(),
            "margin": (r_chosen - r_rejected).float().mean().item()}


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> torch.Tensor:
    """DPO on the log-ratio difference h = (π_c - ref_c) - (π_r - ref_r):

        sigmoid (Rafailov et al. 2023):  L = -log σ(β h)
        ipo     (Azar et al. 2023):      L = (h - 1/(2β))²

    IPO regresses h to a finite target instead of pushing it to infinity, so it does not
    overfit deterministic preferences.
    """
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    if kind == "sigmoid":
        return F.softplus(-beta * h).mean()
    if kind == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    raise ValueError(f"unknown DPO loss {kind!r} (use 'sigmoid' or 'ipo')")


def chosen_nll(pi_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The NLL regulariser DPO adds on chosen responses (RPO, Pang et al. 2024; Llama 3 uses it
    with coefficient 0.2), length-normalised per response:

        L_NLL = mean over pairs of -π_c / |c|

    where π_c is the summed log-prob of the chosen response and |c| its token count. The DPO
    loss only sees the difference h, so it can lower log π(c) and log π(r) together; this term
    keeps the chosen response's likelihood from falling while the rejected one is pushed down.
    """
    return (-pi_chosen / chosen_tokens.to(pi_chosen.dtype).clamp(min=1.0)).mean()


def dpo_metrics(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> dict[str, float]:
    """DPO's implicit rewards β(π - ref): their mean margin, and how often chosen beats rejected."""
    chosen, rejected = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
    return {"reward_accuracy": (chosen > rejected).float().mean().item(),
            "reward_margin": (chosen - rejected).float().mean().item(),
            "logratio": (pi_chosen - pi_rejected).float().mean().item()}
