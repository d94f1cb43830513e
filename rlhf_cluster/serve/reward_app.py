"""Reward scoring service: one or more reward models behind a batched, authenticated HTTP API.

    POST /v1/score     {"items": [{"prompt", "response"} | {"messages": [...]}]}
                       -> {"scores": [...]} (+ "per_model" when several models; scores are their mean)
    POST /get_reward   OpenRLHF's remote RM protocol: {"query": [full text], "prompts", "labels"}
                       -> {"rewards": [...], "scores": sigmoid(rewards) in [0, 1], "extra_logs": {...}}
                       With `functions:` in the app's args, reward functions (verifiers) score too: the
                       response is each query after its prompt, and the function sees prompts and labels.
    GET  /healthz      loaded models and batching settings; 503 naming the problem when the last health
                       check failed (a served model no longer gives a finite score to the probe item)

Scoring needs a token with the "score" scope (rlhf_cluster/serve/common.py; "generate" is still accepted, with a
warning in the log, for one release); `require_token: false` opens it to anyone who reaches the port.

This module is the deployment: its args, routes, batching, health and hot swap. The request and response bodies are
in reward_schemas.py; loading, encoding and running a reward model (any transformers
AutoModelForSequenceClassification directory with one output) in reward_model.py. Items from concurrent requests
are batched with @serve.batch.

Hot swap: `load_checkpoint` (called by the checkpoints app on promotion, by `reconfigure`, or
when the registry's serving pointer changes) loads the new model next to the old one and then
replaces the set of models in one assignment; requests already encoded finish on the old set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Literal

import torch
from fastapi import Depends, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from rlhf_cluster.lib.data import DataError
from rlhf_cluster.lib.reward_functions import FunctionReward, RewardFunctionError
from rlhf_cluster.serve.common import (
    GRACEFUL_SHUTDOWN_TIMEOUT_S,
    ReplicatedAppArgs,
    guard_replica,
    guarded_app,
    promoted_change,
    require_scope,
    unprocessable,
)
from rlhf_cluster.serve.reward_model import (
    RewardModel,
    encode_messages,
    encode_query,
    forward_items,
    load_reward_model,
    probe,
)
from rlhf_cluster.serve.reward_schemas import GetRewardRequest, GetRewardResponse, ScoreRequest, ScoreResponse

logger = logging.getLogger("ray.serve")


class UserConfig(BaseModel):
    """What `reconfigure` accepts (the deployment's user_config): batching, and optionally new model paths."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0)
    models: dict[str, str] | None = None


class RewardAppArgs(ReplicatedAppArgs):
    """Arguments of `app_builder` (the `args:` of the application in configs/serve.yaml); the tokens, body limit and
    replica settings are common.py's."""

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
    require_token: bool = True           # scoring needs a token with the "score" scope ("generate": deprecated)
    # the dtype the models score in: bfloat16 pays on CPUs with bf16 units (avx512_bf16 / amx_bf16) and on GPUs;
    # scores then differ from float32's at bf16's precision (2e-3 on the built-in model's; tests/test_serve_reward.py)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Serve's access log line per request; false drops it (no measurable throughput gain: bench/README.md)
    access_log: bool = True

    @model_validator(mode="after")
    def _functions_load(self) -> RewardAppArgs:
        from rlhf_cluster.lib.reward_functions import load_function

        for spec in self.functions.values():
            load_function(spec)  # importable and callable, or the deploy fails saying which
        return self


app, _limits = guarded_app("rlhf-cluster reward service",
                           "Scores (prompt, response) pairs with reward models; OpenRLHF-compatible /get_reward.",
                           RewardAppArgs)
scorer = [Depends(require_scope("score", "generate"))]  # "generate" scored until "score" existed: accepted, logged


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
        guard_replica(app, _limits, args, args.require_token,
                      "free use of the reward models' CPU/GPU, and of any reward functions on the caller's text")
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
        entry = await promoted_change(self.registry, "reward", self.models[self.primary].checkpoint_id,
                                      self._failed_ids)
        if entry is not None:
            self._follow_task = asyncio.create_task(self.load_checkpoint(entry))  # keep a reference

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[dict, dict]]) -> list[dict[str, float]]:
        """items: (models, {name: token ids}); items encoded against different model sets are run separately."""
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(items))
        return await asyncio.to_thread(forward_items, items)

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
    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, dependencies=scorer)
    async def score(self, body: ScoreRequest):
        if not self.models:
            raise unprocessable("this service hosts reward functions only "
                                f"({', '.join(self.functions)}): score on /get_reward with prompts and labels")
        per_model = await self._score(encode_messages, [item.conversation() for item in body.items], "items")
        scores = [sum(s) / len(s) for s in zip(*per_model.values())]
        return ScoreResponse(scores=scores, per_model=per_model if len(per_model) > 1 else None)

    @app.post("/get_reward", response_model=GetRewardResponse, dependencies=scorer)
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
        **args.replica_options(), logging_config={"enable_access_log": args.access_log},
        user_config={"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
    ).bind(args.model_dump(exclude={"max_batch_size", "batch_wait_timeout_s"}))  # those go via reconfigure
