"""A served reward model: load it, encode what it scores, run it. No Serve and no HTTP here, so the benchmark and the
tests run exactly what a replica runs (rlhf_cluster/serve/reward_app.py), in their own process.

A reward model is any transformers AutoModelForSequenceClassification directory with one output. A (prompt,
response) pair is rendered with the model's own chat template exactly as reward training renders it
(rlhf_cluster.lib.data.encode_conversation), and the score is the model's output at the last token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cluster.lib.data import encode_conversation

PROBE_TEXT = "Hello."    # scored by every model when loaded and at every Serve health check


@dataclass(frozen=True)
class RewardModel:
    name: str
    path: str
    model: torch.nn.Module
    tokenizer: object
    max_tokens: int
    checkpoint_id: str | None = None
    sha256: str | None = None

    def info(self) -> dict:
        return {"path": self.path, "checkpoint_id": self.checkpoint_id, "sha256": self.sha256,
                "max_tokens": self.max_tokens}


def load_reward_model(name: str, path: str, max_tokens: int | None = None, checkpoint_id: str | None = None,
                      sha256: str | None = None, dtype: str = "float32") -> RewardModel:
    """Load a reward model directory; checks it has one output, (when given) the sha256 of its files, and that
    it scores: a probe item must give a finite score, so a model that cannot score (e.g. the NaN weights of
    a diverged run) is refused here, never served."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not Path(path).is_dir():  # else transformers takes it for a Hub repo id and says so
        raise FileNotFoundError(f"reward model {name!r}: {path} is not a directory")
    if sha256 is not None:
        from rlhf_cluster.lib.registry import checkpoint_sha256

        actual = checkpoint_sha256(path)
        if actual != sha256:
            raise ValueError(f"checkpoint {checkpoint_id or path}: files have sha256 {actual}, "
                             f"registered {sha256}; refusing to load a changed checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {path} has {model.config.num_labels} outputs; a reward model has 1")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    rm = RewardModel(name, str(path), model, tokenizer, min(limit, max_tokens or limit), checkpoint_id, sha256)
    probe(rm)
    return rm


def probe(rm: RewardModel) -> float:
    """Score PROBE_TEXT; ValueError naming the model unless that gives a finite score."""
    try:
        score = forward(rm, [encode_query(rm, PROBE_TEXT)])[0]
    except Exception as e:
        raise ValueError(f"reward model {rm.name!r} ({rm.path}) cannot score: {type(e).__name__}: {e}") from e
    if not math.isfinite(score):
        raise ValueError(f"reward model {rm.name!r} ({rm.path}) gives a non-finite score ({score}) to a probe item")
    return score


def encode_messages(rm: RewardModel, messages: list[dict]) -> list[int]:
    return encode_conversation(rm.tokenizer, messages)[0]


def encode_query(rm: RewardModel, text: str) -> list[int]:
    """OpenRLHF sends prompt+response as rendered text; like its server, end it with exactly one EOS."""
    tok = rm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    drop = {tok.pad_token_id, tok.eos_token_id} - {None}
    while ids and ids[-1] in drop:
        ids.pop()
    return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])


@torch.inference_mode()
def forward(rm: RewardModel, batch: list[list[int]]) -> list[float]:
    """Right-padded batch; the sequence-classification head reads the last non-pad token."""
    width = max(len(ids) for ids in batch)
    pad = rm.model.config.pad_token_id
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return rm.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()


def forward_items(items: list[tuple[dict, dict]]) -> list[dict[str, float]]:
    """Score a batch of items, each (models, {name: token ids}): every item by every model of its set. Items of
    concurrent requests may have been encoded against different sets (a hot swap in between), so each set runs on
    its own items."""
    out: list[dict[str, float]] = [{} for _ in items]
    groups: dict[int, list[int]] = {}
    for i, (models, _) in enumerate(items):
        groups.setdefault(id(models), []).append(i)
    for idxs in groups.values():
        models = items[idxs[0]][0]
        for name, rm in models.items():
            for i, score in zip(idxs, forward(rm, [items[i][1][name] for i in idxs])):
                out[i][name] = score
    return out
