"""Frozen models that only score: the reference policy and the reward model(s).

Ranks are data-parallel replicas (no optimiser, no process group needed).
"""

from __future__ import annotations

import torch

from actors.group import Worker
from rlhf_cluster.lib import algorithms as A
from rlhf_cluster.lib.data import pad_batch


def _sequences(samples: list[dict]) -> list[list[int]]:
    return [s["prompt_ids"] + s["response_ids"] for s in samples]


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

    def logprobs_of_samples(self, samples: list[dict]) -> list[list[float]]:
        """`logprobs` of an engine's samples (prompt + response), passed straight from the engine's call:
        scoring starts as soon as that engine's chunk is done, without a trip through the coordinator."""
        return self.logprobs(_sequences(samples))


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

    def score_samples(self, samples: list[dict]) -> list[float]:
        """`score` of an engine's samples (see ReferenceModel.logprobs_of_samples)."""
        return self.score(_sequences(samples))


class RemoteRewardModel(Worker):
    """The reward slot filled by an HTTP reward service instead of a local model: this project's
    reward app, or any server speaking OpenRLHF's `POST /get_reward` ({"query": [...]} ->
    {"rewards": [...]}). Sequences are decoded to text with the policy's tokenizer (special tokens
    kept: the query is the rendered chat) and sent in batches; the service ends every query with
    exactly one EOS, as OpenRLHF's server does. Connection errors, timeouts and 5xx/429 answers are
    retried with backoff; a 4xx is an error naming the service's message."""

    def __init__(self, rank, world_size, master_addr, master_port, url: str, tokenizer_path: str,
                 token_env: str = "RLHF_REWARD_TOKEN", batch_size: int = 64, timeout_s: float = 60.0,
                 retries: int = 5):
        super().__init__(rank, world_size, master_addr, master_port)
        import os

        import httpx
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        token = os.environ.get(token_env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.url, self.batch_size, self.retries = url, batch_size, retries

    def _post(self, queries: list[str]) -> list[float]:
        import time

        import httpx

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post("/get_reward", json={"query": queries})
                if r.status_code < 400:
                    rewards = r.json()["rewards"]
                    if len(rewards) != len(queries):
                        raise ValueError(f"{self.url}: {len(rewards)} rewards for {len(queries)} queries")
                    return [float(x) for x in rewards]
                if r.status_code < 500 and r.status_code != 429:
                    raise ValueError(f"reward service {self.url} refused the request ({r.status_code}): {r.text[:300]}")
                problem = f"HTTP {r.status_code}"
            except (httpx.TransportError, httpx.TimeoutException) as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt == self.retries:
                raise ConnectionError(f"reward service {self.url} failed {self.retries + 1} times; last: {problem}")
            time.sleep(delay)
            delay = min(2 * delay, 8.0)

    def score(self, sequences: list[list[int]]) -> list[float]:
        out = []
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i:i + self.batch_size]
            out += self._post([self.tokenizer.decode(s, skip_special_tokens=False) for s in chunk])
        return out

    def score_samples(self, samples: list[dict]) -> list[float]:
        return self.score(_sequences(samples))
