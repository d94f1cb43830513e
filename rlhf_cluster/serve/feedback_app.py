"""Feedback API: people (or applications) say which served answer was better; a feedback round trains on it.

    POST /v1/feedback                 a comparison, rating, safety flag or edit (rlhf_cluster/lib/feedback.py);
                                      `Idempotency-Key: <key>` makes a retry safe. 201 with the stored record
                                      (200 when the key was seen with the same body, 409 with another body)
    GET  /v1/feedback/export          ?since=<cursor>&format=preferences|records&aspect=&limit=
                                      JSON lines: preference rows in the reward stage's format, or the raw
                                      records; the `x-next-cursor` header is where the next export starts
    GET  /v1/feedback/export.parquet  the same as Parquet
    GET  /v1/feedback/healthz         the store and how many records it holds
    POST /v1/feedback/rounds          start a feedback round (rlhf_cluster/feedback_round.py) on what was sent
                                      since the last one: a Ray job (the cluster's Jobs API), one at a time.
                                      Optional body {"min_pairs": n} (this round only). 202 with its id; 409
                                      while another round runs
    GET  /v1/feedback/rounds          the rounds started here, newest first
    GET  /v1/feedback/rounds/{id}     its state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), the round's summary
                                      once it ended (what it trained, what it promoted), the tail of its log
    DELETE /v1/feedback/rounds/{id}   stop a round that has not ended (202; 409 if it has). The feedback it
                                      would have taken waits for the next round

Sending feedback needs a token with the "feedback" scope; rounds need "promote"; exporting (every user's prompts and
answers) needs "admin" (rlhf_cluster/serve/common.py). Unknown answer ids, self-comparisons, a prompt that is not the
answers' own, oversized bodies: 4xx naming the problem.
The store is the one the policy app keeps its answers in (SQLite by default, Redis in a cluster).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Body, Depends, Header, HTTPException, Query, Response
from fastapi import Path as FPath
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rlhf_cluster.lib.feedback import (
    KEY_PATTERN,
    ROUND_ID_ENV,
    ROUND_SUMMARY_LINE,
    Feedback,
    FeedbackError,
    KeyConflict,
    StoreUnavailable,
    add_feedback,
    feedback_location,
    open_feedback_store,
    preference_rows,
)
from rlhf_cluster.serve.common import (
    AppArgs,
    Principal,
    guard_replica,
    guarded_app,
    require_scope,
)

logger = logging.getLogger("ray.serve")


class RoundArgs(BaseModel):
    """How POST /v1/feedback/rounds runs a round: `python -m rlhf_cluster.feedback_round --config CONFIG OVERRIDES`
    submitted as a Ray job, with this app's feedback store."""
    model_config = ConfigDict(extra="forbid")
    config: str | None = None          # the round's config file; null: configs/feedback-round-tiny.yaml
    overrides: list[str] = []          # key=value, as on the command line (registry=..., output_dir=..., ...)
    jobs_address: str | None = None    # the Ray Jobs API, e.g. http://HEAD:8265; null: this cluster's (from the GCS)
    runtime_env: dict = {}             # the job's runtime_env (env_vars, ...)


class FeedbackAppArgs(AppArgs):
    """Arguments of `app_builder`; the tokens are common.py's."""

    feedback: str | None = None        # redis://..., a SQLite file; null: $RLHF_FEEDBACK / $REDIS_URL / default
    rounds: RoundArgs | None = RoundArgs()  # null: no rounds over HTTP (POST /v1/feedback/rounds answers 404)
    max_body_bytes: int = Field(256 << 10, ge=1024)
    max_export: int = Field(100_000, ge=1)
    num_cpus: float = Field(0.1, gt=0.0)


app, _limits = guarded_app("rlhf-cluster feedback",
                           "Preferences about served answers, stored durably and exported for reward training.",
                           FeedbackAppArgs)
operator = [Depends(require_scope("promote"))]  # rounds
exporter = [Depends(require_scope("admin"))]    # every user's prompts and answers
Cursor = Annotated[str | None, Query(max_length=64, pattern=r"^[0-9-]+$")]


def _error(e: Exception) -> HTTPException:
    if isinstance(e, KeyConflict):
        return HTTPException(409, str(e))
    if isinstance(e, StoreUnavailable):
        return HTTPException(503, str(e))
    return HTTPException(422, str(e))  # UnknownAnswer, self-comparisons, ...: the request names what is wrong


class RoundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_pairs: int | None = Field(None, ge=1)  # this round only: run with fewer new pairs than the config asks


class RoundBusy(Exception):
    pass


class JobsUnavailable(Exception):
    pass


class Rounds:
    """Feedback rounds as Ray jobs, tagged in their metadata; their state is the Jobs API's, their summary the
    line the round prints last (ROUND_SUMMARY_LINE), read from the job's logs (any node)."""

    TAG = {"rlhf_cluster": "feedback_round"}

    def __init__(self, args: RoundArgs, feedback: str):
        from rlhf_cluster.lib.config import CONFIG_DIR, FeedbackRoundConfig, load_config

        config = Path(args.config).resolve() if args.config else CONFIG_DIR / "feedback-round-tiny.yaml"
        overrides = [*args.overrides, f"feedback={feedback}"]  # the store this app writes, whatever the file says
        # a bad round config fails the deployment (the error names the key), not the first round a user starts
        cfg = load_config(FeedbackRoundConfig, config, overrides)
        self.output_dir = Path(cfg.output_dir).resolve()
        self.entrypoint = shlex.join([sys.executable, "-m", "rlhf_cluster.feedback_round", "--config", str(config),
                                      *overrides, f"output_dir={self.output_dir}"])
        self.args = args
        self._client = None

    def client(self):
        if self._client is None:
            import ray
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.args.jobs_address or ray.get_runtime_context().gcs_address)
            except Exception as e:
                raise JobsUnavailable(f"the Ray Jobs API is not reachable ({e}); a round needs the cluster's "
                                      "dashboard (rounds.jobs_address)") from None
        return self._client

    def _jobs(self, call: str, *args, **kwargs):
        """One call to the Jobs API. Not reaching it, or an error it answers, is JobsUnavailable (503): the
        request was fine, the cluster's dashboard was not. A job that does not exist is None (404)."""
        try:
            return getattr(self.client(), call)(*args, **kwargs)
        except JobsUnavailable:
            raise
        except Exception as e:
            if call != "submit_job" and "status code 404" in str(e):  # "Job ... does not exist"
                return None
            raise JobsUnavailable(f"the Ray Jobs API failed ({call}: {type(e).__name__}: {e})") from None

    def list(self) -> list[dict]:
        jobs = [j for j in self._jobs("list_jobs") if (j.metadata or {}).get("rlhf_cluster") == "feedback_round"]
        return [self._state(j) for j in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)]

    def start(self, min_pairs: int | None = None) -> dict:
        busy = [j for j in self.list() if j["status"] in ("PENDING", "RUNNING")]
        if busy:
            raise RoundBusy(f"round {busy[0]['id']} is {busy[0]['status']}; one round at a time")
        rid = f"feedback-round-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        env = dict(self.args.runtime_env)
        env["env_vars"] = {**env.get("env_vars", {}), ROUND_ID_ENV: rid}
        entrypoint = self.entrypoint + (f" min_pairs={min_pairs}" if min_pairs else "")
        self._jobs("submit_job", entrypoint=entrypoint, submission_id=rid, runtime_env=env, metadata=self.TAG)
        return {"id": rid, "status": "PENDING", "url": f"/v1/feedback/rounds/{rid}"}

    def get(self, rid: str) -> dict | None:
        job = self._jobs("get_job_info", rid)
        if job is None or (job.metadata or {}).get("rlhf_cluster") != "feedback_round":
            return None
        state = self._state(job)
        logs = self._jobs("get_job_logs", rid) or ""
        summary = [line[len(ROUND_SUMMARY_LINE):] for line in logs.splitlines() if line.startswith(ROUND_SUMMARY_LINE)]
        return {**state, "summary": json.loads(summary[-1]) if summary else None, "log_tail": logs[-4000:]}

    def stop(self, rid: str) -> dict | None:
        state = self.get(rid)
        if state is None:
            return None
        if state["status"] not in ("PENDING", "RUNNING"):
            raise RoundBusy(f"round {rid} already ended ({state['status']})")
        self._jobs("stop_job", rid)  # SIGTERM to the round's driver; its actors go with it
        return {"id": rid, "status": "STOPPING"}

    @staticmethod
    def _state(job) -> dict:
        def iso(ms):
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None

        return {"id": job.submission_id, "status": str(job.status.value if hasattr(job.status, "value")
                                                        else job.status),
                "message": job.message, "started": iso(job.start_time), "ended": iso(job.end_time)}


RoundId = Annotated[str, FPath(max_length=80, pattern=r"^feedback-round-[0-9a-z-]+$")]


@serve.deployment(name="Feedback", max_ongoing_requests=64, graceful_shutdown_wait_loop_s=2,
                  graceful_shutdown_timeout_s=60)
@serve.ingress(app)
class FeedbackDeployment:
    def __init__(self, args: dict):
        args = FeedbackAppArgs.model_validate(args)
        self.args = args
        guard_replica(app, _limits, args)
        self.store = open_feedback_store(args.feedback)
        self.rounds = Rounds(args.rounds, feedback_location(args.feedback)) if args.rounds else None
        self._starting = asyncio.Lock()  # two POSTs at once start one round
        logger.info("feedback app: store %s; rounds %s", self.store.describe(),
                    self.rounds.entrypoint if self.rounds else "off")

    def _add(self, feedback, key: str | None, annotator: str) -> tuple[dict, bool]:
        return add_feedback(self.store, feedback, annotator, key)

    @app.post("/", status_code=201)
    async def send(self, response: Response, feedback: Annotated[Feedback, Body()],
                   principal: Annotated[Principal, Depends(require_scope("feedback"))],
                   idempotency_key: Annotated[str | None, Header(pattern=KEY_PATTERN)] = None):
        try:
            record, created = await asyncio.to_thread(self._add, feedback, idempotency_key, principal.name)
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

    @app.get("/export", dependencies=exporter)
    async def export(self, since: Cursor = None, format: Literal["preferences", "records"] = "preferences",
                     aspect: Literal["helpfulness", "safety"] | None = None,
                     limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000):
        rows, cursor = await asyncio.to_thread(self._export, since, min(limit, self.args.max_export), format, aspect)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        return Response(text, media_type="application/x-ndjson", headers={"x-next-cursor": cursor or ""})

    @app.get("/export.parquet", dependencies=exporter)
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

    def _rounds(self) -> Rounds:
        if self.rounds is None:
            raise HTTPException(404, "this feedback app starts no rounds (its args set rounds: null)")
        return self.rounds

    async def _round_call(self, fn, *args):
        """A Rounds call off the event loop, its errors as HTTP answers: busy 409, Jobs API down 503, unknown 404."""
        try:
            result = await asyncio.to_thread(fn, *args)
        except RoundBusy as e:
            raise HTTPException(409, str(e)) from None
        except JobsUnavailable as e:
            raise HTTPException(503, str(e)) from None
        if result is None:
            raise HTTPException(404, f"no feedback round {args[0]!r}")
        return result

    @app.post("/rounds", status_code=202, dependencies=operator)
    async def start_round(self, request: Annotated[RoundRequest | None, Body()] = None):
        rounds = self._rounds()
        async with self._starting:
            return await self._round_call(rounds.start, request.min_pairs if request else None)

    @app.get("/rounds", dependencies=operator)
    async def list_rounds(self):
        return {"rounds": await self._round_call(self._rounds().list)}

    @app.get("/rounds/{rid}", dependencies=operator)
    async def get_round(self, rid: RoundId):
        return await self._round_call(self._rounds().get, rid)

    @app.delete("/rounds/{rid}", status_code=202, dependencies=operator)
    async def stop_round(self, rid: RoundId):
        return await self._round_call(self._rounds().stop, rid)

    @app.get("/healthz")
    async def healthz(self):
        try:
            count = await asyncio.to_thread(self.store.count)
        except StoreUnavailable as e:
            return Response(json.dumps({"status": "unavailable", "error": str(e)}), status_code=503,
                            media_type="application/json")
        return {"status": "ok", "store": self.store.describe(), "records": count}


def app_builder(args: FeedbackAppArgs) -> serve.Application:
    """import_path target: `rlhf_cluster.serve.feedback_app:app_builder` with the application's `args:`."""
    if isinstance(args, dict):
        args = FeedbackAppArgs.model_validate(args)
    return FeedbackDeployment.options(ray_actor_options={"num_cpus": args.num_cpus}).bind(args.model_dump())
