"""Frozen models that only score: the reference policy and the reward model(s).

Ranks are data-parallel replicas (no optimiser, no process group needed).
"""

from __future__ import annotations

import torch

from actors.group import Worker
from rlhf_cluster import algorithms as A
from rlhf_cluster.data import pad_batch


def _dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bfloat16" else torch.float32


class ReferenceModel(Worker):
    """The frozen initial policy: per-token log-probs for the KL penalty."""

    def __init__(self, rank, world_size, master_addr, master_port, model_path: str, dtype: str = "float32",
                 micro_batch_size: int = 16):
        super().__init__(rank, world_size, master_addr, master_port)
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_dtype(dtype)).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        out = []
        for i in range(0, len(sequences), self.micro_batch_size):
            chunk = sequences[i:i + self.micro_batch_size]
            ids, att = pad_batch(chunk, self.pad_id)
            lp = A.sequence_token_logprobs(self.model, ids, att)
            out += [row[: len(s) - 1].tolist() for row, s in zip(lp, chunk)]
        return out


class RewardModel(Worker):
    """A sequence-classification reward model: one scalar per (prompt + response) sequence.

    The score is read at the last real token (transformers pools at the last non-pad token),
    so sequences should end with the end-of-turn token, as the chat template renders them.
    """

    def __init__(self, rank, world_size, master_addr, master_port, model_path: str, dtype: str = "float32",
                 micro_batch_size: int = 16):
        super().__init__(rank, world_size, master_addr, master_port)
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=_dtype(dtype)).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model needs one output, it has {self.model.config.num_labels}")
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            raise ValueError(f"{model_path}: config has no pad_token_id; the score position cannot be found")
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[float]:
        out = []
        for i in range(0, len(sequences), self.micro_batch_size):
            ids, att = pad_batch(sequences[i:i + self.micro_batch_size], self.pad_id)
            out += self.model(input_ids=ids, attention_mask=att).logits[:, 0].float().tolist()
        return out
