"""The math of post-training as small pure torch functions (no Ray, no DeepSpeed).

Actors call these; tests check them against hand-computed numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) per position: logits [B, T, V], labels [B, T] -> [B, T]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def sequence_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1 of right-padded sequences: [B, T] -> [B, T-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
