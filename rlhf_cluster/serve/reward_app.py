"""Reward scoring service: one or more reward models behind a batched, authenticated HTTP API.

    POST /v1/score     {"items": [{"prompt", "response"} | {"messages": [...]}]}
                       -> {"scores": [...]} (+ "per_model" when several models; scores are their mean)
    POST /get_reward   OpenRLHF's remote RM protocol: {"query": [full text], "prompts", "labels"}
                       -> {"rewards": [...], "scores": sigmoid(rewards) in [0, 1], "extra_logs": {...}}
                       With `functions:` in the app's args, reward functions (verifiers) score too: the
                       response is each query after its prompt, and the function sees prompts and labels.
    GET  /healthz      loaded models and batching settings; 503 naming the problem when the last health
                       check failed (a served model no longer gives a finite score to the probe item)

A reward model is any transformers AutoModelForSequenceClassification directory with one output.
A (prompt, response) pair is rendered with the model's own chat template exactly as reward
training renders it (rlhf_cluster.lib.data.encode_conversation), and the score is the model's output
at the last token. Items from concurrent requests are batched with @serve.batch.

Hot swap: `load_checkpoint` (called by the checkpoints app on promotion, by `reconfigure`, or
when the registry's serving pointer changes) loads the new model next to the old one and then
replaces the set of models in one assignment; requests already encoded finish on the old set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from rlhf_cluster.lib.data import DataError, encode_conversation
from rlhf_cluster.lib.reward_functions import FunctionReward, RewardFunctionError
from rlhf_cluster.serve.common import (
    guard_replica,
    install_guards,
    require_scope,
    unprocessable,
)

logger = logging.getLogger("ray.serve")

MAX_ITEMS = 512          # items per request
MAX_CHARS = 16_384       # characters per string
MAX_MESSAGES = 32        # turns per conversation
# A replica being stopped (redeploy, scale-down, shutdown) takes no new requests and waits up to this
# long for the ones it has: as long as the HTTP request_timeout_s (configs/serve.yaml), so no request
# the proxy still waits for is cut off. It exits as soon as it is idle (checked every 2 s).
GRACEFUL_SHUTDOWN_TIMEOUT_S = 300.0
PROBE_TEXT = "Hello."    # scored by every model when loaded and at every Serve health check

Text = Annotated[str, Field(max_length=MAX_CHARS)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


class Item(BaseModel):
    """Either prompt + response, or a whole conversation ending with the assistant turn to score."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text | None = None
    response: Text | None = None
    messages: Annotated[list[Message], Field(min_length=2, max_length=MAX_MESSAGES)] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Item:
        either = "give either both 'prompt' and 'response', or 'messages'"
        if self.messages is None:
            if self.prompt is None or self.response is None:
                raise ValueError(either)
            return self
        if self.prompt is not None or self.response is not None:
            raise ValueError(either)
        if self.messages[0].role == "assistant":
            raise ValueError("'messages' must start with a user or system turn")
        if self.messages[-1].role != "assistant":
            raise ValueError("'messages' must end with the assistant turn to score")
        return self

    def conversation(self) -> list[dict]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: Annotated[list[Item], Field(min_length=1, max_length=MAX_ITEMS)]


class ScoreResponse(BaseModel):
    scores: list[float]
    per_model: dict[str, list[float]] | None = None


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model request; unknown extra fields are ignored as OpenRLHF forks add some."""

    model_config = ConfigDict(extra="ignore")
    query: Annotated[list[Annotated[str, Field(max_length=2 * MAX_CHARS)]], Field(min_length=1, max_length=MAX_ITEMS)]
    prompts: list[Annotated[str, Field(max_length=2 * MAX_CHARS)]] | None = None
    labels: list[Any] | None = None  # ground truth for rule-based rewards; unused by a learned RM

    @model_validator(mode="after")
    def _same_lengths(self) -> GetRewardRequest:
        for name in ("prompts", "labels"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.query):
                raise ValueError(f"'{name}' has {len(value)} entries but 'query' has {len(self.query)}")
        return self


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class UserConfig(BaseModel):
    """What `reconfigure` accepts (the deployment's user_config): batching, and optionally new model paths."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0)
    models: dict[str, str] | None = None


class RewardAppArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` of the application in configs/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, str] = {}          # name -> model directory; empty (and no functions): the built-in one
    # name -> "package.module:function" (rlhf_cluster/lib/reward_functions.py): verifiers on /get_reward,
    # called with the request's prompts, the responses (each query after its prompt) and its labels
    functions: dict[str, str] = {}
    function_timeout_s: float = Field(30.0, gt=0.0)
    registry: str | None = None          # redis://... or a directory; null: $REDIS_URL / default directory
    follow_registry: bool = True         # serve the registry's promoted reward checkpoint (first model's slot)
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=8)   # default: the model's max_position_embeddings
    max_body_bytes: int = Field(1 << 20, ge=1024)
    require_token: bool = False          # bearer token on the scoring routes
    token_file: str | None = None
    tokens_file: str | None = None       # named tokens with scopes (common.py); scoring needs "generate"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0.0)
    # the dtype the models score in: bfloat16 pays on CPUs with bf16 units (avx512_bf16 / amx_bf16) and on GPUs;
    # scores then differ from float32's at bf16's precision (2e-3 on the built-in model's; tests/test_serve_reward.py)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_ongoing_requests: int = Field(64, ge=1)
    # Serve's access log line per request; false drops it (no measurable throughput gain: bench/README.md)
    access_log: bool = True
    graceful_shutdown_timeout_s: float = Field(GRACEFUL_SHUTDOWN_TIMEOUT_S, ge=0.0)

    @model_validator(mode="after")
    def _functions_load(self) -> RewardAppArgs:
        from rlhf_cluster.lib.reward_functions import load_function

        for spec in self.functions.values():
            load_function(spec)  # importable and callable, or the deploy fails saying which
        return self


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


app = FastAPI(title="rlhf-cluster reward service", version="1",
              description="Scores (prompt, response) pairs with reward models; OpenRLHF-compatible /get_reward.")
_limits = {"max_body_bytes": 1 << 20}  # per replica process; set from the app's args in __init__
install_guards(app, _limits)


def default_model(builtin=None) -> tuple[dict[str, str], str]:
    """What a service given no models serves (before the registry's promoted checkpoint, which replaces it
    when there is one): the trained built-in reward model if it was trained, else the untrained reward_base."""
    from rlhf_cluster.lib.builtin import cache_root, ensure_builtin
    from rlhf_cluster.lib.config import BuiltinConfig

    builtin = builtin or BuiltinConfig()
    trained = cache_root(builtin) / "reward" / "model"
    if (trained / "config.json").exists():
        return {"reward": str(trained)}, f"the trained built-in reward model {trained}"
    base = ensure_builtin(builtin, log=logger.info).reward_base
    logger.warning("no trained built-in reward model (python -m rlhf_cluster.reward trains it): its scores mean "
                   "nothing until one is promoted or given in the app's args")
    return {"reward": str(base)}, (f"the UNTRAINED built-in reward_base {base} "
                                   "(train one: python -m rlhf_cluster.reward)")


@serve.deployment(name="RewardModel", max_ongoing_requests=64, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S)
@serve.ingress(app)
class RewardDeployment:
    def __init__(self, args: dict):
        args = RewardAppArgs.model_validate(args)
        self.args = args
        guard_replica(app, _limits, args, args.require_token)
        torch.set_num_threads(max(1, int(args.num_cpus)))
        self.registry = None
        if args.follow_registry:
            from rlhf_cluster.lib.registry import open_registry

            self.registry = open_registry(args.registry)
        paths, self.source = dict(args.models), "the models in the app's args"
        if not paths and not args.functions:
            paths, self.source = default_model()
        self.primary = next(iter(paths), None)  # None: functions only
        self.functions = {name: FunctionReward(name, spec, args.function_timeout_s)
                          for name, spec in args.functions.items()}
        self.models = {name: load_reward_model(name, path, args.max_tokens, dtype=args.dtype)
                       for name, path in paths.items()}
        self._load_lock = asyncio.Lock()
        self._failed_ids: set[str] = set()
        self.unready: str | None = None  # why the last health check failed; /healthz reports it
        self._leaving = False
        self.batches = self.largest_batch = 0
        self.swaps = 0
        promoted = self.registry.serving("reward") if self.registry and self.primary else None
        if promoted is not None:
            try:
                self.models[self.primary] = self._load_entry(self.primary, promoted.model_dump())
                self.source = f"the registry's promoted reward checkpoint {promoted.id}"
            except Exception as e:  # the models from args keep serving
                self._failed_ids.add(promoted.id)
                logger.error("not serving promoted checkpoint %s: %s", promoted.id, e)
        self._set_batching(args.max_batch_size, args.batch_wait_timeout_s)
        logger.info("reward service: serving %s", self.source)

    # ------------------------------------------------------------------ configuration and hot swap
    def _set_batching(self, max_batch_size: int, wait_s: float) -> None:
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(wait_s)
        self.max_batch_size, self.batch_wait_timeout_s, self.largest_batch = max_batch_size, wait_s, 0

    def _load_entry(self, name: str, entry: dict) -> RewardModel:
        return load_reward_model(name, entry["path"], self.args.max_tokens, entry.get("id"), entry.get("sha256"),
                                 self.args.dtype)

    async def reconfigure(self, user_config: dict) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s, models?}; changes apply without a restart."""
        cfg = UserConfig.model_validate(user_config)
        self._set_batching(cfg.max_batch_size, cfg.batch_wait_timeout_s)
        for name, path in (cfg.models or {}).items():
            if name not in self.models or self.models[name].path != path:
                result = await self.load_checkpoint({"path": path}, name=name)
                if not result["ok"]:  # fail the config update; the old models keep serving
                    raise ValueError(f"user_config models.{name}: {result['error']}")

    async def load_checkpoint(self, checkpoint: dict, name: str | None = None) -> dict:
        """Load {"path", "id"?, "sha256"?} into slot `name` (default: the first model) and swap it in.

        Scoring goes on with the old models while the new one loads; the swap is one assignment.
        Returns {"ok": true, "model": info} or {"ok": false, "error": why}.
        """
        name = name or self.primary
        async with self._load_lock:
            current = self.models.get(name)
            if current and checkpoint.get("id") and (current.checkpoint_id, current.sha256) == (
                    checkpoint["id"], checkpoint.get("sha256")):
                return {"ok": True, "name": name, "model": current.info()}  # already serving it
            try:
                rm = await asyncio.to_thread(self._load_entry, name, checkpoint)
            except Exception as e:  # missing files, sha mismatch, not a reward model, ...
                self._failed_ids.add(checkpoint.get("id") or checkpoint.get("path"))
                logger.exception("could not load reward checkpoint %s", checkpoint)
                return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            self.models = {**self.models, name: rm}
            self.swaps += 1
        logger.info("now serving %s in slot %s", checkpoint, name)
        return {"ok": True, "name": name, "model": rm.info()}

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s (5 s), and once before a new replica gets traffic.

        Readiness: every loaded model must score the probe item (a finite score); otherwise this raises,
        Serve marks the replica unhealthy and replaces it, and /healthz answers 503 with the reason.
        Then it follows the registry, so that every replica (not only the one the checkpoints app
        told) converges on the promoted checkpoint."""
        models = self.models
        try:
            if not models and not self.functions:
                raise ValueError("no reward model is loaded")
            for rm in models.values():
                await asyncio.to_thread(probe, rm)
        except Exception as e:
            self.unready = str(e)[:2000]
            logger.error("health check failed: %s", self.unready)
            raise RuntimeError(self.unready) from None
        self.unready = None
        if self.registry is None or self.primary is None or self._load_lock.locked():
            return
        try:
            entry = await asyncio.to_thread(self.registry.serving, "reward")
        except Exception as e:  # a registry outage must not mark the replica unhealthy
            logger.warning("registry unavailable: %s", e)
            return
        if entry and entry.id != self.models[self.primary].checkpoint_id and entry.id not in self._failed_ids:
            self._follow_task = asyncio.create_task(self.load_checkpoint(entry.model_dump()))  # keep a reference

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[dict, dict]]) -> list[dict[str, float]]:
        """items: (models, {name: token ids}); items encoded against different model sets are run separately."""
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(items))
        return await asyncio.to_thread(self._forward_items, items)

    @staticmethod
    def _forward_items(items):
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

    async def _score(self, encode, inputs: list, field: str) -> dict[str, list[float]]:
        """Encode every input for every model (422 when too long), then score through the batcher."""
        models = self.models  # one snapshot for the whole request
        encoded = []
        for i, x in enumerate(inputs):
            ids = {}
            for name, rm in models.items():
                try:
                    ids[name] = encode(rm, x)
                except DataError as e:
                    raise unprocessable(str(e), [field, i]) from None
                if len(ids[name]) > rm.max_tokens:
                    raise unprocessable(f"is {len(ids[name])} tokens for model {name!r}, "
                                        f"more than its limit of {rm.max_tokens}", [field, i])
                if not ids[name]:
                    raise unprocessable("renders to no tokens", [field, i])
            encoded.append((models, ids))
        if self.unready:  # the last health check failed: Serve is replacing this replica
            raise self._unavailable(self.unready)
        results = await asyncio.gather(*[self._score_batch(e) for e in encoded])
        for name, rm in models.items():
            bad = [i for i, r in enumerate(results) if not math.isfinite(r[name])]
            if bad:  # never a wrong answer: either this input or the model itself is at fault
                try:
                    await asyncio.to_thread(probe, rm)
                except ValueError as e:
                    self._leave(str(e))
                    raise self._unavailable(self.unready) from None
                raise unprocessable(f"reward model {name!r} gives a non-finite score to it", [field, bad[0]])
        return {name: [r[name] for r in results] for name in models}

    def _leave(self, why: str) -> None:
        """The model went bad at run time (the probe item scores non-finite too): answer 503 and end this process
        a moment later, so Serve starts a healthy replica at once. Waiting for its health checks instead (three
        failures in a row, 5 s apart) keeps the replica for ~15 s, and the router sends it more traffic the faster
        it refuses (measured: 28 of 4,766 requests failed even with 4 client retries; tests/test_serve_chaos.py)."""
        self.unready = why
        try:
            serve.get_replica_context()
        except Exception:  # not a Serve replica (the class called in a test's process): nothing to end
            return
        if not self._leaving:
            self._leaving = True
            logger.error("leaving: %s", why)
            asyncio.get_running_loop().call_later(0.5, os._exit, 1)

    @staticmethod
    def _unavailable(why: str) -> HTTPException:
        """503, retry: this replica cannot score; it is being replaced, and the proxy sends a retried request to
        another replica."""
        return HTTPException(503, f"{why}; this replica is being replaced, try again", headers={"Retry-After": "1"})

    # ------------------------------------------------------------------ routes
    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True,
              dependencies=[Depends(require_scope("generate"))])
    async def score(self, body: ScoreRequest):
        if not self.models:
            raise unprocessable("this service hosts reward functions only "
                                f"({', '.join(self.functions)}): score on /get_reward with prompts and labels")
        per_model = await self._score(encode_messages, [item.conversation() for item in body.items], "items")
        scores = [sum(s) / len(s) for s in zip(*per_model.values())]
        return ScoreResponse(scores=scores, per_model=per_model if len(per_model) > 1 else None)

    @app.post("/get_reward", response_model=GetRewardResponse, dependencies=[Depends(require_scope("generate"))])
    async def get_reward(self, body: GetRewardRequest):
        per_source = {f"rm_{name}": s for name, s in (await self._score(encode_query, body.query, "query")).items()
                      } if self.models else {}
        if self.functions:
            per_source |= await self._functions(body)
        rewards = [sum(s) / len(s) for s in zip(*per_source.values())]
        extra = per_source if len(per_source) > 1 else {}
        return GetRewardResponse(rewards=rewards, scores=[1 / (1 + math.exp(-r)) for r in rewards],
                                 extra_logs=extra)

    async def _functions(self, body: GetRewardRequest) -> dict[str, list[float]]:
        """Every reward function on the request: responses are the queries after their prompts."""
        if body.prompts is None:
            raise unprocessable(f"the reward functions ({', '.join(self.functions)}) need 'prompts' (each query's "
                                "prompt part), and 'labels' where they read them", ["prompts"])
        for i, (query, prompt) in enumerate(zip(body.query, body.prompts)):
            if not query.startswith(prompt):
                raise unprocessable("does not start with its prompt (prompts[i])", ["query", i])
        responses = [q[len(p):] for q, p in zip(body.query, body.prompts)]
        labels = body.labels if body.labels is not None else [None] * len(body.query)
        out = {}
        for name, fn in self.functions.items():
            try:
                out[f"fn_{name}"] = await asyncio.to_thread(fn, body.prompts, responses, labels)
            except RewardFunctionError as e:  # the request made the verifier fail: the client's to see
                raise unprocessable(str(e)) from None
        return out

    @app.get("/healthz")
    async def healthz(self):
        models = self.models
        # the last health check (at most health_check_period_s ago) failed
        if (not models and not self.functions) or self.unready:
            return JSONResponse({"status": "unavailable", "error": self.unready or "no reward model is loaded"},
                                status_code=503)
        return {"status": "ok", "replica": serve.get_replica_context().replica_id.unique_id,
                "models": {n: rm.info() for n, rm in models.items()}, "source": self.source,
                "functions": self.args.functions,
                "swaps": self.swaps,
                "batching": {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
                             "batches": self.batches, "largest_batch": self.largest_batch}}


def app_builder(args: RewardAppArgs) -> serve.Application:
    """import_path target: `rlhf_cluster.serve.reward_app:app_builder` with the application's `args:`."""
    if isinstance(args, dict):
        args = RewardAppArgs.model_validate(args)
    return RewardDeployment.options(
        num_replicas=args.num_replicas, max_ongoing_requests=args.max_ongoing_requests,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s, ray_actor_options={"num_cpus": args.num_cpus},
        logging_config={"enable_access_log": args.access_log},
        user_config={"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
    ).bind(args.model_dump(exclude={"max_batch_size", "batch_wait_timeout_s"}))  # those go via reconfigure
