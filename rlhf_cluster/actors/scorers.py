"""Frozen models that only score: the reference policy and the reward model(s).

Ranks are data-parallel replicas (no optimiser, no process group needed), or with `partition` one ZeRO-3
process group whose ranks each hold a shard of the parameters and run every forward together.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlhf_cluster.actors.group import Worker, split_evenly
from rlhf_cluster.lib.logprobs import model_logprobs
from rlhf_cluster.lib.packing import micro_batch_rows, packed_batch, take
from rlhf_cluster.lib.reward_functions import FunctionReward, RewardFunctionError


def _sequences(samples: list[dict]) -> list[list[int]]:
    return [s["prompt_ids"] + s["response_ids"] for s in samples]


def _dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bfloat16" else torch.float32


class _Scorer(Worker):
    """Micro-batches of `micro_batch_size` padded sequences, or with `max_tokens_per_micro_batch`
    sequences packed into rows (lib/packing.py). With `partition` the model's parameters are ZeRO-3 shards
    (lib/deepspeed_setup.partitioned_model); every rank then makes as many forward passes as the busiest one."""

    def __init__(self, rank, world_size, master_addr, master_port, micro_batch_size: int = 16,
                 max_tokens_per_micro_batch: int | None = None, partition: bool = False, offload: bool = False):
        super().__init__(rank, world_size, master_addr, master_port)
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens_per_micro_batch
        self.partition, self.offload = partition, offload

    def _load(self, cls, model_path: str, dtype: str, **kwargs):
        if not self.partition:
            return cls.from_pretrained(model_path, dtype=_dtype(dtype), **kwargs).eval()
        from rlhf_cluster.lib.deepspeed_setup import partitioned_model

        self.engine = partitioned_model(cls, model_path, dtype, self.offload, self.micro_batch_size, **kwargs)
        return self.engine.module

    def _batches(self, sequences: list[list[int]]):
        """(Packed inputs, the indices of `sequences` in them) per micro-batch. Partitioned, a rank with fewer
        micro-batches than its peers adds fillers (nothing to take from them): each forward gathers every layer
        from all ranks, so all must make the same calls."""
        batches = [packed_batch(sequences, rows, self.pad_id)
                   for rows in micro_batch_rows([len(s) for s in sequences], self.micro_batch_size, self.max_tokens)]
        if self.partition:
            most = torch.tensor([len(batches)])
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            filler = replace(packed_batch([[self.pad_id] * 2], [[0]], self.pad_id), places={})
            batches += [filler] * (int(most) - len(batches))
        return batches

    def set_micro_batching(self, micro_batch_size: int | None = None, max_tokens_per_micro_batch: int | None = None):
        """Change how calls split their sequences (benchmarks and tests compare padded and packed)."""
        self.micro_batch_size = micro_batch_size or self.micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch

    def my_share(self, *engine_samples: list[dict]) -> list[dict]:
        """This rank's contiguous share of the samples of several engine calls, in order (a partitioned group
        is called on every rank at once; its ranks' results, joined in rank order, follow the samples)."""
        return split_evenly([s for part in engine_samples for s in part], self.world_size)[self.rank]


class ReferenceModel(_Scorer):
    """The frozen initial policy: per-token log-probs for the KL penalty."""

    def __init__(self, rank, world_size, master_addr, master_port, model_path: str, dtype: str = "float32",
                 micro_batch_size: int = 16, max_tokens_per_micro_batch: int | None = None, partition: bool = False,
                 offload: bool = False):
        super().__init__(rank, world_size, master_addr, master_port, micro_batch_size, max_tokens_per_micro_batch,
                         partition, offload)
        from transformers import AutoModelForCausalLM

        self.model = self._load(AutoModelForCausalLM, model_path, dtype)
        self.pad_id = self.model.config.pad_token_id or 0

    @torch.no_grad()
    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        out: dict[int, list[float]] = {}
        for b in self._batches(sequences):
            lp, _ = model_logprobs(self.model, b.input_ids, b.attention_mask, b.position_ids)
            out |= take(b, lp, {i: len(sequences[i]) - 1 for i in b.places})
        return [out[i] for i in range(len(sequences))]

    def logprobs_of_samples(self, samples: list[dict]) -> list[list[float]]:
        """`logprobs` of an engine's samples (prompt + response), passed straight from the engine's call:
        scoring starts as soon as that engine's chunk is done, without a trip through the coordinator."""
        return self.logprobs(_sequences(samples))

    def logprobs_of_share(self, *engine_samples: list[dict]) -> list[list[float]]:
        """`logprobs` of this rank's share of several engines' samples (a partitioned group's chained call)."""
        return self.logprobs(_sequences(self.my_share(*engine_samples)))


class RewardModel(_Scorer):
    """A sequence-classification reward model: one scalar per (prompt + response) sequence.

    The score is read at the last token of each sequence (where transformers pools, at the last
    non-pad token), so sequences should end with the end-of-turn token, as the chat template renders them.
    """

    def __init__(self, rank, world_size, master_addr, master_port, model_path: str, dtype: str = "float32",
                 micro_batch_size: int = 16, max_tokens_per_micro_batch: int | None = None, partition: bool = False,
                 offload: bool = False):
        super().__init__(rank, world_size, master_addr, master_port, micro_batch_size, max_tokens_per_micro_batch,
                         partition, offload)
        from transformers import AutoModelForSequenceClassification

        self.model = self._load(AutoModelForSequenceClassification, model_path, dtype)
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model needs one output, it has {self.model.config.num_labels}")
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            raise ValueError(f"{model_path}: config has no pad_token_id; the score position cannot be found")

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[float]:
        out: dict[int, float] = {}
        for b in self._batches(sequences):
            if self.max_tokens is None:  # padded: transformers pools at each row's last real token
                scores = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, 0]
                out |= {i: scores[r].item() for i, (r, _) in b.places.items()}
                continue
            # packed (a micro-batch may hold one sequence per row): the head on every position, read at each
            # sequence's last token. The path follows the config, not the batch: partitioned ranks keep in step
            hidden = self.model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                           position_ids=b.position_ids).last_hidden_state
            per_token = self.model.score(hidden)[..., 0].float()
            out |= {i: per_token[r, at + len(sequences[i]) - 1].item() for i, (r, at) in b.places.items()}
        return [out[i] for i in range(len(sequences))]

    def score_samples(self, samples: list[dict], context: list[dict] | None = None) -> list[float]:
        """`score` of an engine's samples (see ReferenceModel.logprobs_of_samples); a model needs no context."""
        return self.score(_sequences(samples))

    def score_share(self, *engine_samples: list[dict]) -> list[float]:
        """`score` of this rank's share of several engines' samples (a partitioned group's chained call)."""
        return self.score(_sequences(self.my_share(*engine_samples)))


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

    def _post(self, queries: list[str], extra: dict | None = None) -> list[float]:
        import time

        import httpx

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post("/get_reward", json={"query": queries, **(extra or {})})
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

    def score(self, sequences: list[list[int]], prompts: list[list[int]] | None = None,
              labels: list | None = None) -> list[float]:
        """Scores of full sequences; with `prompts` (their prompt parts) and `labels`, the request carries
        them too, as OpenRLHF's protocol does ("prompts": the rendered prompt texts, "labels")."""
        out = []
        for i in range(0, len(sequences), self.batch_size):
            chunk = slice(i, i + self.batch_size)
            extra = {}
            if prompts is not None:
                extra["prompts"] = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts[chunk]]
            if labels is not None and any(x is not None for x in labels):  # unlabelled data sends none
                extra["labels"] = labels[chunk]
            out += self._post([self.tokenizer.decode(s, skip_special_tokens=False) for s in sequences[chunk]], extra)
        return out

    def score_samples(self, samples: list[dict], context: list[dict] | None = None) -> list[float]:
        """Scores of an engine's samples; `context` (per prompt of the call: {"prompt", "label"}) adds the
        labels to the request."""
        labels = [context[s["prompt_index"]].get("label") for s in samples] if context else None
        return self.score(_sequences(samples), [s["prompt_ids"] for s in samples], labels)


class RewardSources(Worker):
    """The reward as a weighted sum of sources (`rewards:` in the config): learned reward models, Python
    functions of (prompts, responses, labels), and remote endpoints, all held by each rank.

    Functions see the prompt's last user turn, the response without special tokens, and the label
    the prompt record carried (data.label_key). combine="llama2" applies Llama 2's rule to the terms named
    helpfulness and safety instead of the weighted sum. Calls with track=True add each term's scores (and the
    functions' extra metrics) to sums that `drain_metrics` hands to the coordinator once an iteration."""

    def __init__(self, rank, world_size, master_addr, master_port, sources: list[dict], tokenizer_path: str,
                 dtype: str = "float32", micro_batch_size: int = 16, max_tokens_per_micro_batch: int | None = None,
                 combine: str = "weighted_sum", safety_threshold: float = 0.15):
        super().__init__(rank, world_size, master_addr, master_port)
        import math

        self.combine, self.safety_logit = combine, math.log(safety_threshold / (1 - safety_threshold))
        self.tracked: dict[str, list[float]] = {}  # metric -> [sum, count] since the last drain
        from transformers import AutoTokenizer

        from rlhf_cluster.lib.config import RewardSource

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.terms = []
        for src in map(RewardSource.model_validate, sources):
            if src.model:
                scorer = RewardModel(rank, world_size, master_addr, master_port, src.model, dtype, micro_batch_size,
                                     max_tokens_per_micro_batch)
            elif src.url:
                scorer = RemoteRewardModel(rank, world_size, master_addr, master_port, src.url, tokenizer_path,
                                           src.token_env, src.batch_size, src.timeout_s)
            else:
                scorer = FunctionReward(src.name, src.fn, src.timeout_s)
            self.terms.append((src, scorer))

    def score_samples(self, samples: list[dict], context: list[dict] | None = None, track: bool = False) -> list[float]:
        parts = {}
        for src, scorer in self.terms:
            if isinstance(scorer, FunctionReward):
                if context is None:
                    raise RewardFunctionError(f"reward function {src.name!r} needs the prompts and labels of the "
                                              "samples; this call passed none")
                prompts = [context[s["prompt_index"]]["prompt"] for s in samples]
                labels = [context[s["prompt_index"]].get("label") for s in samples]
                responses = [self.tokenizer.decode(s["response_ids"], skip_special_tokens=True) for s in samples]
                values = scorer(prompts, responses, labels)
                if track:
                    for name, xs in scorer.last_metrics.items():
                        self._track(f"reward/{src.name}/{name}", xs)
            else:
                values = scorer.score_samples(samples, context)
            parts[src.name] = values
            if track:
                self._track(f"reward/{src.name}", values)
        if self.combine == "llama2":  # Llama 2: safety where the prompt is flagged or the response looks unsafe
            from rlhf_cluster.lib import algorithms as A

            unsafe = torch.tensor([bool(context and context[s["prompt_index"]].get("unsafe")) for s in samples])
            return A.llama2_combined_reward(torch.tensor(parts["helpfulness"]), torch.tensor(parts["safety"]),
                                            unsafe, self.safety_logit).tolist()
        weights = {src.name: src.weight for src, _ in self.terms}
        return [sum(weights[name] * values[i] for name, values in parts.items()) for i in range(len(samples))]

    def _track(self, key: str, values: list[float]) -> None:
        acc = self.tracked.setdefault(key, [0.0, 0])
        acc[0] += sum(values)
        acc[1] += len(values)

    def drain_metrics(self) -> dict[str, list[float]]:
        """{metric: [sum, count]} of the tracked calls since the last drain, and start again."""
        out, self.tracked = self.tracked, {}
        return out
