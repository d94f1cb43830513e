"""Feedback API: people (or applications) say which served answer was better; a feedback round trains on it.

    POST /v1/feedback                 a comparison, rating, safety flag or edit (rlhf_cluster/lib/feedback.py);
                                      `Idempotency-Key: <key>` makes a retry safe. 201 with the stored record
                                      (200 when the key was seen with the same body, 409 with another body)
    GET  /v1/feedback/export          ?since=<cursor>&format=preferences|records&aspect=&limit=
                                      JSON lines: preference rows in the reward stage's format, or the raw
                                      records; the `x-next-cursor` header is where the next export starts
    GET  /v1/feedback/export.parquet  the same as Parquet
    GET  /v1/feedback/healthz         the store and how many records it holds

Sending feedback needs a token with the "feedback" scope; exporting needs "promote" (serve/common.py). Unknown
answer ids, self-comparisons, a prompt that is not the answers' own, oversized bodies: 4xx naming the problem.
The store is the one the policy app keeps its answers in (SQLite by default, Redis in a cluster).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Annotated, Literal

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rlhf_cluster.lib.feedback import (
    KEY_PATTERN,
    Feedback,
    FeedbackError,
    KeyConflict,
    StoreUnavailable,
    body_hash,
    new_record_id,
    open_feedback_store,
    preference_rows,
    resolve,
)
from serve.common import TokenAuth, install_guards, load_scoped_tokens, load_token, require_scope

logger = logging.getLogger("ray.serve")


class FeedbackAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    feedback: str | None = None        # redis://..., a SQLite file; null: $RLHF_FEEDBACK / $REDIS_URL / default
    token_file: str | None = None
    tokens_file: str | None = None
    max_body_bytes: int = Field(256 << 10, ge=1024)
    max_export: int = Field(100_000, ge=1)
    num_cpus: float = Field(0.1, gt=0.0)


app = FastAPI(title="rlhf-cluster feedback", version="1",
              description="Preferences about served answers, stored durably and exported for reward training.")
_limits = {"max_body_bytes": 256 << 10}
install_guards(app, _limits)
writer = [Depends(require_scope("feedback"))]
operator = [Depends(require_scope("promote"))]
Cursor = Annotated[str | None, Query(max_length=64, pattern=r"^[0-9-]+$")]


def _error(e: Exception) -> HTTPException:
    if isinstance(e, KeyConflict):
        return HTTPException(409, str(e))
    if isinstance(e, StoreUnavailable):
        return HTTPException(503, str(e))
    return HTTPException(422, str(e))  # UnknownAnswer, self-comparisons, ...: the request names what is wrong


@serve.deployment(name="Feedback", max_ongoing_requests=64, graceful_shutdown_wait_loop_s=2,
                  graceful_shutdown_timeout_s=60)
@serve.ingress(app)
class FeedbackDeployment:
    def __init__(self, args: dict):
        args = FeedbackAppArgs.model_validate(args)
        self.args = args
        _limits["max_body_bytes"] = args.max_body_bytes
        app.state.auth = TokenAuth(load_token(args.token_file), enabled=True,
                                   scoped=load_scoped_tokens(args.tokens_file))
        self.store = open_feedback_store(args.feedback)
        logger.info("feedback app: store %s", self.store.describe())

    def _add(self, feedback, key: str | None) -> tuple[dict, bool]:
        record = resolve(feedback, self.store.get_answer)
        record = {"id": new_record_id(), **record}
        return self.store.add(record, body_hash(feedback.model_dump(mode="json")), key)

    @app.post("/", status_code=201, dependencies=writer)
    async def send(self, response: Response, feedback: Annotated[Feedback, Body()],
                   idempotency_key: Annotated[str | None, Header(pattern=KEY_PATTERN)] = None):
        try:
            record, created = await asyncio.to_thread(self._add, feedback, idempotency_key)
        except (FeedbackError, StoreUnavailable) as e:
            raise _error(e) from None
        if not created:
            response.status_code = 200
        return record

    def _export(self, since: str | None, limit: int, fmt: str, aspect: str | None) -> tuple[list[dict], str | None]:
        try:
            records = self.store.since(since, limit)
        except (FeedbackError, StoreUnavailable) as e:
            raise _error(e) from None
        rows = records if fmt == "records" else preference_rows(records, aspect)
        return rows, (records[-1]["cursor"] if records else since)

    @app.get("/export", dependencies=operator)
    async def export(self, since: Cursor = None, format: Literal["preferences", "records"] = "preferences",
                     aspect: Literal["helpfulness", "safety"] | None = None,
                     limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000):
        rows, cursor = await asyncio.to_thread(self._export, since, min(limit, self.args.max_export), format, aspect)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        return Response(text, media_type="application/x-ndjson", headers={"x-next-cursor": cursor or ""})

    @app.get("/export.parquet", dependencies=operator)
    async def export_parquet(self, since: Cursor = None, format: Literal["preferences", "records"] = "preferences",
                             aspect: Literal["helpfulness", "safety"] | None = None,
                             limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, cursor = await asyncio.to_thread(self._export, since, min(limit, self.args.max_export), format, aspect)
        buf = io.BytesIO()
        # nested fields as JSON text when rows differ in shape (records), so every row fits one schema
        table = pa.Table.from_pylist([{k: json.dumps(v) if isinstance(v, dict | list) and format == "records"
                                       else v for k, v in r.items()} for r in rows])
        pq.write_table(table, buf)
        return Response(buf.getvalue(), media_type="application/vnd.apache.parquet",
                        headers={"x-next-cursor": cursor or ""})

    @app.get("/healthz")
    async def healthz(self):
        try:
            count = await asyncio.to_thread(self.store.count)
        except StoreUnavailable as e:
            return Response(json.dumps({"status": "unavailable", "error": str(e)}), status_code=503,
                            media_type="application/json")
        return {"status": "ok", "store": self.store.describe(), "records": count}


def app_builder(args: FeedbackAppArgs) -> serve.Application:
    """import_path target: `serve.feedback_app:app_builder` with the application's `args:`."""
    if isinstance(args, dict):
        args = FeedbackAppArgs.model_validate(args)
    return FeedbackDeployment.options(ray_actor_options={"num_cpus": args.num_cpus}).bind(args.model_dump())
