"""How samples from the engines become trainer items, and ragged per-token lists become tensors."""

from __future__ import annotations

import torch


def padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-token lists -> ([B, T] right-padded tensor, mask)."""
    width = max(len(r) for r in rows)
    x, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return x, mask


def unpadded(x: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [x[i, :n].tolist() for i, n in enumerate(lengths)]


def trainer_item(sample: dict, **response_fields: list[float]) -> dict:
    """A trainer item: full sequence, loss mask and per-token fields over the response positions.

    Position t of a trainer array predicts token t+1, so the response starts at len(prompt) - 1.
    """
    pad = len(sample["prompt_ids"]) - 1
    item = {"input_ids": sample["prompt_ids"] + sample["response_ids"],
            "loss_mask": [0] * pad + [1] * len(sample["response_ids"])}
    for key, values in response_fields.items():
        item[key] = [0.0] * pad + list(values)
    return item


def response_part(sample: dict, full: list[float]) -> list[float]:
    return full[len(sample["prompt_ids"]) - 1:]
