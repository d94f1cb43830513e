"""Padding-free batches: sequences packed into rows that keep them apart.

A packed row holds several sequences one after another; each restarts its positions at 0 and attends
only within itself (a block-diagonal causal mask), so every token's output equals what the sequence
gives alone. Packing removes padding; it never lets one sample see another. Used by SFT
(`packing: true`) and by the RL groups' `max_tokens_per_micro_batch` (trainer, critic, reference, reward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens: longest first, each into the
    first row with room (first-fit decreasing). A sequence longer than `capacity` gets a row to itself."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, u in enumerate(used):
            if u + lengths[i] <= capacity:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def micro_batch_rows(lengths: list[int], micro_batch_size: int, max_tokens: int | None) -> list[list[list[int]]]:
    """Each micro-batch as rows of sequence indices.

    Padded (`max_tokens` None): `micro_batch_size` sequences, one per row, in order.
    Packed: sequences packed first-fit into rows no wider than the longest one (so attention, computed
    densely under a mask, costs no more than with padding), then as many rows per micro-batch as fit in
    `max_tokens` tokens: micro-batches are balanced by tokens, not by sample count.
    """
    if not lengths:
        return []
    if max_tokens is None:
        return [[[i] for i in range(s, min(s + micro_batch_size, len(lengths)))]
                for s in range(0, len(lengths), micro_batch_size)]
    width = max(lengths)
    rows = first_fit(lengths, width)
    per = max(1, max_tokens // width)
    return [rows[i:i + per] for i in range(0, len(rows), per)]


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, W], pad-filled after each row's sequences
    attention_mask: torch.Tensor  # [R, W] padding mask if no row holds two sequences; else [R, 1, W, W] bool
    position_ids: torch.Tensor | None  # [R, W], restarting at each sequence; None when unpacked
    places: dict[int, tuple[int, int]]  # sequence index -> (row, first column)


def packed_batch(sequences: list[list[int]], rows: list[list[int]], pad_id: int) -> Packed:
    """The model inputs for `rows` (lists of indices into `sequences`)."""
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    places = {}
    for r, row in enumerate(rows):
        at = 0
        for j, i in enumerate(row):
            n = len(sequences[i])
            ids[r, at:at + n] = torch.tensor(sequences[i], dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = j
            places[i] = (r, at)
            at += n
    if all(len(row) == 1 for row in rows):  # unpacked: the ordinary right-padding mask
        return Packed(ids, (seg >= 0).long(), None, places)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (seg.unsqueeze(2) == seg.unsqueeze(1)) & (seg.unsqueeze(2) >= 0)
    attn = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only (no NaN)
    return Packed(ids, attn.unsqueeze(1), pos, places)


def place(packed: Packed, values: list[list[float]], width: int) -> torch.Tensor:
    """Per-sequence lists (indexed like the sequences given to packed_batch) laid out where `packed`
    put their sequences: [R, width], zero elsewhere."""
    out = torch.zeros(packed.input_ids.shape[0], width)
    for i, (r, at) in packed.places.items():
        out[r, at:at + len(values[i])] = torch.tensor(values[i], dtype=torch.float32)
    return out


def take(packed: Packed, x: torch.Tensor, lengths: dict[int, int]) -> dict[int, list[float]]:
    """The inverse of place: each sequence's first `lengths[i]` values of a per-position output [R, W']."""
    return {i: x[r, at:at + lengths[i]].tolist() for i, (r, at) in packed.places.items()}
