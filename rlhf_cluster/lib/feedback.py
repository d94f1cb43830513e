"""Feedback: the answers the policy service gave, and what people said about them.

The policy app (rlhf_cluster/serve/policy_app.py) keeps every answer it gives: its id (the completion's own id), the
prompt as chat messages, each choice's response, the sampling settings and the policy version (the registry
entry it was served from). The feedback app (rlhf_cluster/serve/feedback_app.py) takes what the seeds' annotation
protocols produce about answers, or about any responses sent as text with their prompt:

    comparison  two responses to one prompt: which is better and by how much (Llama 2's strengths;
                "unsure" counts as negligibly better), for one aspect (helpfulness | safety), optionally
                with an edited, improved response (Llama 3: edited > chosen > rejected)
    rating      one response rated 1..7 for an aspect
    safety      one response flagged safe or unsafe
    edit        one response and an improved version of it (edited > original)

`resolve` checks a request against the stored answers and turns it into a self-contained record (texts,
prompt, the policy versions that produced them); `preference_rows` turns records into the reward stage's
preference rows (data.py's format, with "strength", "aspect" and "edited").

Stores, one interface:
    embedded   a SQLite file (the default; no server): WAL with synchronous=FULL, so a record acknowledged
               to a client survives a crash of the process or the machine.
    Redis      open_feedback_store("redis://..."): answers as keys, feedback as a stream (XADD) on a server
               with AOF on (deploy/base/redis.yaml); Redis writes the AOF before it replies, so an
               acknowledged record survives a kill -9 of redis-server.
Both keep an idempotency key per record (the client's `Idempotency-Key`, else the record's own id): the same
key with the same body gives back the stored record, with another body is a conflict. Records are read in
arrival order from an opaque cursor, which is how a feedback round takes "what came since the last round".
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CHARS = 16_384
MAX_MESSAGES = 32
ANSWER_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")
Strength = Literal["significantly_better", "better", "slightly_better", "negligibly_better", "unsure"]
Aspect = Literal["helpfulness", "safety"]
Text = Annotated[str, Field(max_length=MAX_CHARS)]


class FeedbackError(ValueError):
    """A feedback request that cannot be used as it is (unknown answer, self-comparison, ...): a 422."""


class UnknownAnswer(FeedbackError):
    pass


class KeyConflict(FeedbackError):
    """The idempotency key was used before with another body: a 409."""


class StoreUnavailable(RuntimeError):
    """The backend could not be reached: a 503."""


# --------------------------------------------------------------------------- requests
class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


Prompt = Text | Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class ResponseRef(BaseModel):
    """A served answer (its id, and which choice when it had several) or a response given as text."""

    model_config = ConfigDict(extra="forbid")
    answer_id: str | None = Field(None, pattern=ANSWER_ID)
    choice: int = Field(0, ge=0, le=63)
    response: Text | None = None

    @model_validator(mode="after")
    def _one(self) -> ResponseRef:
        if (self.answer_id is None) == (self.response is None):
            raise ValueError("give either 'answer_id' (a served answer) or 'response' (a text)")
        return self


class _Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Prompt | None = None  # needed when a response is given as text; else the answers' own prompt
    annotator_note: Annotated[str, Field(max_length=128)] | None = None  # the client's own note, stored as given

    @model_validator(mode="before")
    @classmethod
    def _annotator_is_the_servers(cls, data):
        if isinstance(data, dict) and "annotator" in data:
            raise ValueError("'annotator' is set by the server: every record names the principal of the token that "
                             "sent it; a note of the client's own goes in 'annotator_note'")
        return data


class Comparison(_Feedback):
    type: Literal["comparison"]
    chosen: ResponseRef
    rejected: ResponseRef
    strength: Strength = "better"
    aspect: Aspect = "helpfulness"
    edited: Text | None = None  # an improved response, better than both


class Rating(_Feedback):
    type: Literal["rating"]
    response: ResponseRef
    rating: int = Field(ge=1, le=7)
    aspect: Aspect = "helpfulness"


class SafetyFlag(_Feedback):
    type: Literal["safety"]
    response: ResponseRef
    safe: bool


class Edit(_Feedback):
    type: Literal["edit"]
    response: ResponseRef
    edited: Text


Feedback = Annotated[Comparison | Rating | SafetyFlag | Edit, Field(discriminator="type")]


def as_messages(prompt: str | list) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [m.model_dump() if isinstance(m, BaseModel) else dict(m) for m in prompt]


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resolve(feedback: BaseModel, get_answer, annotator: str) -> dict:
    """The record to store: every response as text with its provenance, the one prompt they answer, and the
    annotator: the principal whose token sent it (never a name the client chose).

    get_answer(answer_id) -> the stored answer dict or None. Raises FeedbackError naming what is wrong."""
    given = as_messages(feedback.prompt) if feedback.prompt is not None else None
    prompts = []

    def one(ref: ResponseRef, field: str) -> dict:
        if ref.response is not None:
            if given is None:
                raise FeedbackError(f"{field}: a response given as text needs the 'prompt' it answers")
            return {"response": ref.response}
        answer = get_answer(ref.answer_id)
        if answer is None:
            raise UnknownAnswer(f"{field}.answer_id: no served answer has id {ref.answer_id!r}")
        if ref.choice >= len(answer["responses"]):
            raise FeedbackError(f"{field}.choice: answer {ref.answer_id!r} has {len(answer['responses'])} "
                                f"choice(s), not {ref.choice + 1}")
        prompts.append((field, answer["prompt"]))
        return {"response": answer["responses"][ref.choice], "answer_id": ref.answer_id, "choice": ref.choice,
                "policy": answer.get("policy")}

    record: dict[str, Any] = {"type": feedback.type, "annotator": annotator}
    if feedback.annotator_note is not None:
        record["annotator_note"] = feedback.annotator_note
    if isinstance(feedback, Comparison):
        record |= {"chosen": one(feedback.chosen, "chosen"), "rejected": one(feedback.rejected, "rejected"),
                   "strength": feedback.strength, "aspect": feedback.aspect, "edited": feedback.edited}
        same_ref = (feedback.chosen.answer_id is not None
                    and (feedback.chosen.answer_id, feedback.chosen.choice)
                    == (feedback.rejected.answer_id, feedback.rejected.choice))
        if same_ref or record["chosen"]["response"] == record["rejected"]["response"]:
            raise FeedbackError("chosen and rejected are the same response: a comparison needs two different ones")
        if feedback.edited is not None and feedback.edited == record["chosen"]["response"]:
            raise FeedbackError("edited: the edited response is the chosen one unchanged")
    else:
        record["response"] = one(feedback.response, "response")
        if isinstance(feedback, Rating):
            record |= {"rating": feedback.rating, "aspect": feedback.aspect}
        elif isinstance(feedback, SafetyFlag):
            record["safe"] = feedback.safe
        else:
            if feedback.edited == record["response"]["response"]:
                raise FeedbackError("edited: the edited response is the original unchanged")
            record["edited"] = feedback.edited
    for field, prompt in prompts:
        if given is not None and prompt != given:
            raise FeedbackError(f"{field}: answer {getattr(feedback, field).answer_id!r} answered another prompt "
                                "than the 'prompt' given")
        given = prompt
    record["prompt"] = given
    return record


# --------------------------------------------------------------------------- export
def preference_rows(records: list[dict], aspect: str | None = None) -> list[dict]:
    """The reward stage's preference rows ({"prompt": messages, "chosen": [turn], "rejected": [turn],
    "strength", "aspect", optional "edited"}) from feedback records:
    comparisons directly ("unsure" -> negligibly_better); edits as edited > original (significantly better);
    ratings of one prompt and aspect pairwise, the higher rated chosen (strength from the gap: 3+ significantly,
    2 better, 1 slightly); safety flags of one prompt, each safe response over each unsafe one."""
    def turn(text):
        return [{"role": "assistant", "content": text}]

    def row(prompt, chosen, rejected, strength, asp, fid, edited=None):
        out = {"prompt": prompt, "chosen": turn(chosen), "rejected": turn(rejected), "strength": strength,
               "aspect": asp, "feedback_id": fid}
        return out | ({"edited": turn(edited)} if edited else {})

    rows, rated, flagged = [], {}, {}
    for r in records:
        key = json.dumps(r["prompt"], sort_keys=True)
        if r["type"] == "comparison":
            strength = "negligibly_better" if r["strength"] == "unsure" else r["strength"]
            rows.append(row(r["prompt"], r["chosen"]["response"], r["rejected"]["response"], strength,
                            r["aspect"], r["id"], r.get("edited")))
        elif r["type"] == "edit":
            rows.append(row(r["prompt"], r["edited"], r["response"]["response"], "significantly_better",
                            "helpfulness", r["id"]))
        elif r["type"] == "rating":
            rated.setdefault((key, r["aspect"]), []).append(r)
        elif r["type"] == "safety":
            flagged.setdefault(key, []).append(r)
    for (_, asp), group in rated.items():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a["rating"] != b["rating"] and a["response"]["response"] != b["response"]["response"]:
                    hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
                    gap = hi["rating"] - lo["rating"]
                    strength = "significantly_better" if gap >= 3 else ("better" if gap == 2 else "slightly_better")
                    rows.append(row(a["prompt"], hi["response"]["response"], lo["response"]["response"], strength,
                                    asp, f"{hi['id']}>{lo['id']}"))
    for group in flagged.values():
        for s in (g for g in group if g["safe"]):
            for u in (g for g in group if not g["safe"]):
                if s["response"]["response"] != u["response"]["response"]:
                    rows.append(row(s["prompt"], s["response"]["response"], u["response"]["response"],
                                    "significantly_better", "safety", f"{s['id']}>{u['id']}"))
    return [r for r in rows if aspect is None or r["aspect"] == aspect]


# --------------------------------------------------------------------------- stores
def new_record_id() -> str:
    return "fb-" + uuid.uuid4().hex[:24]


def add_feedback(store, feedback: BaseModel, annotator: str, key: str | None = None) -> tuple[dict, bool]:
    """Resolve `feedback` sent by `annotator` (a principal) and store it once per idempotency key: (the record,
    whether it was created). The key's body is the feedback and who sent it, so another principal reusing a key is
    a conflict, not a retry that silently drops its record."""
    record = {"id": new_record_id(), **resolve(feedback, store.get_answer, annotator)}
    return store.add(record, body_hash({**feedback.model_dump(mode="json"), "annotator": annotator}), key)


class SQLiteStore:
    """The embedded store: one SQLite file; every write is a transaction committed with a full fsync."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS answers (id TEXT PRIMARY KEY, body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                                                 key TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, body TEXT NOT NULL);
        """)

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def put_answer(self, answer: dict) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (answer["id"], json.dumps(answer)))

    def get_answer(self, answer_id: str) -> dict | None:
        with self._lock:
            row = self.db.execute("SELECT body FROM answers WHERE id = ?", (answer_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def add(self, record: dict, request_hash: str, key: str | None = None) -> tuple[dict, bool]:
        """Store `record` (its "id" set) under idempotency `key`; (stored record, created?)."""
        key = key or record["id"]
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT hash, body, seq FROM feedback WHERE key = ?", (key,)).fetchone()
                if row is None:
                    seq = self.db.execute("INSERT INTO feedback (id, key, hash, body) VALUES (?, ?, ?, ?)",
                                          (record["id"], key, request_hash, json.dumps(record))).lastrowid
                    self.db.execute("COMMIT")
                    return {**record, "cursor": str(seq)}, True
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        if row[0] != request_hash:
            raise KeyConflict(f"idempotency key {key!r} was used before with another request body")
        return {**json.loads(row[1]), "cursor": str(row[2])}, False

    def since(self, cursor: str | None = None, limit: int = 1000) -> list[dict]:
        """Records after `cursor` (all with None) in arrival order, each with its own "cursor"."""
        try:
            after = int(cursor) if cursor else 0
        except ValueError:
            raise FeedbackError(f"cursor {cursor!r} is not a cursor of this store") from None
        with self._lock:
            rows = self.db.execute("SELECT seq, body FROM feedback WHERE seq > ? ORDER BY seq LIMIT ?",
                                   (after, limit)).fetchall()
        return [{**json.loads(body), "cursor": str(seq)} for seq, body in rows]

    def count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]


_ADD_SCRIPT = """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if prev then return {0, prev} end
local sid = redis.call('XADD', KEYS[2], '*', 'record', ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({hash = ARGV[2], sid = sid}))
return {1, sid}
"""


class RedisStore:
    """Answers as {prefix}answer:<id> (expiring after answer_ttl_s), feedback as the stream {prefix}stream, the
    idempotency keys in the hash {prefix}keys; a record and its key are added by one Lua script (atomic), so a
    retried write after a lost reply finds its key and adds nothing twice."""

    def __init__(self, url: str, prefix: str = "rlhf:feedback:", answer_ttl_s: int = 90 * 86400,
                 retries: int = 8, backoff_s: float = 0.05, max_backoff_s: float = 2.0):
        import redis

        self._redis = redis
        self.url, self.prefix, self.answer_ttl_s = url, prefix, answer_ttl_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, decode_responses=True)
        self._add = self.client.register_script(_ADD_SCRIPT)

    def describe(self) -> str:
        return f"redis:{self.url.split('@')[-1]}"

    def _retry(self, fn):
        from rlhf_cluster.lib.registry import retry_redis

        return retry_redis(fn, self.describe(), self.retries, self.backoff_s, self.max_backoff_s, StoreUnavailable)

    def put_answer(self, answer: dict) -> None:
        self._retry(lambda: self.client.set(f"{self.prefix}answer:{answer['id']}", json.dumps(answer),
                                            ex=self.answer_ttl_s))

    def get_answer(self, answer_id: str) -> dict | None:
        body = self._retry(lambda: self.client.get(f"{self.prefix}answer:{answer_id}"))
        return json.loads(body) if body else None

    def add(self, record: dict, request_hash: str, key: str | None = None) -> tuple[dict, bool]:
        # without a client key the record's fresh id is the key: finding it stored means our own retry after a lost
        # reply wrote it, so it was created by this request
        own, key = key is None, key or record["id"]
        created, ref = self._retry(lambda: self._add(keys=[f"{self.prefix}keys", f"{self.prefix}stream"],
                                                     args=[key, request_hash, json.dumps(record)]))
        if int(created):
            return {**record, "cursor": ref}, True
        prev = json.loads(ref)
        if prev["hash"] != request_hash:
            raise KeyConflict(f"idempotency key {key!r} was used before with another request body")
        rows = self._retry(lambda: self.client.xrange(f"{self.prefix}stream", prev["sid"], prev["sid"]))
        return {**json.loads(rows[0][1]["record"]), "cursor": prev["sid"]}, own

    def since(self, cursor: str | None = None, limit: int = 1000) -> list[dict]:
        start = f"({cursor}" if cursor else "-"
        try:
            rows = self._retry(lambda: self.client.xrange(f"{self.prefix}stream", start, "+", count=limit))
        except self._redis.ResponseError:
            raise FeedbackError(f"cursor {cursor!r} is not a cursor of this store") from None
        return [{**json.loads(fields["record"]), "cursor": sid} for sid, fields in rows]

    def count(self) -> int:
        return self._retry(lambda: self.client.xlen(f"{self.prefix}stream"))


def default_feedback_path() -> Path:
    from rlhf_cluster.lib.registry import default_registry_dir

    return default_registry_dir().parent / "feedback.sqlite3"


# feedback rounds (rlhf_cluster/feedback_round.py), as the feedback app starts and reads them
# (rlhf_cluster/serve/feedback_app.py)
ROUND_SUMMARY_LINE = "feedback round summary: "  # the round's last line: its summary as JSON
ROUND_ID_ENV = "RLHF_FEEDBACK_ROUND_ID"            # the Ray job's id, recorded in the summary and rounds.json


def feedback_location(location: str | Path | None = None) -> str:
    """Where the store is: `location`, else $RLHF_FEEDBACK, else $REDIS_URL, else the default file; a file path
    made absolute (a round started elsewhere must open the same file)."""
    if location is None:
        location = os.environ.get("RLHF_FEEDBACK") or os.environ.get("REDIS_URL") or default_feedback_path()
    location = str(location)
    return location if "://" in location else str(Path(location).resolve())


def open_feedback_store(location: str | Path | None = None) -> SQLiteStore | RedisStore:
    """redis://... -> Redis; a file path -> SQLite. None: $RLHF_FEEDBACK, else $REDIS_URL, else
    ~/.cache/rlhf-cluster/feedback.sqlite3."""
    location = feedback_location(location)
    if location.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(location)
    if "://" in location:
        raise ValueError(f"feedback store {location!r}: use redis://host:port/db or a file path")
    return SQLiteStore(location)


def read_all(store, cursor: str | None = None, page: int = 1000) -> list[dict]:
    """Every record after `cursor`, paging through the store."""
    out = []
    while batch := store.since(cursor, page):
        out += batch
        cursor = batch[-1]["cursor"]
    return out
