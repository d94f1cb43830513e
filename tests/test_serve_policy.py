"""The service loop on a real local Ray Serve (configs/serve.yaml through rlhf_cluster.serve.launch), called over HTTP,
the policy through the official OpenAI client: answers kept for feedback, feedback validated and stored, scoped
tokens, generated requests (schemathesis), a kill -9 of redis-server while feedback is coming in, rounds started over
HTTP as Ray jobs, two feedback rounds driven by simulated annotators (`long`: make test-long), and a promotion under
concurrent chat load.

The module's service serves the built-in SFT policy as "pol-v1" and the built-in reward model as "rm" (promoted in
the registry before the apps start); the feedback rounds promote what they train; "pol-v2", a perturbed copy of the
SFT policy, is what the promotion test swaps in, last in the module.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from rlhf_cluster.actors.group import free_port
from rlhf_cluster.lib import feedback as F
from rlhf_cluster.lib import task
from rlhf_cluster.lib.registry import FileRegistry, make_entry
from tests.helpers import TOKEN, auth, schemathesis_run, serve_log_text, start_redis

pytestmark = pytest.mark.ray

GEN, ANNOTATOR, OPS = ("gen-token-" + "g" * 20), ("annotator-" + "a" * 20), ("ops-token-" + "o" * 20)
SCORER, READER, ADMIN = ("scorer-token-" + "s" * 20), ("reader-token-" + "r" * 20), ("admin-token-" + "m" * 20)
PROMPT = [{"role": "user", "content": "List 3 fruits."}]


@pytest.fixture(scope="module")
def loop(ray_cluster, builtin_assets, builtin_sft_rm, tmp_path_factory):
    """Policy, feedback and checkpoints apps behind named tokens, one per scope, and the shared TOKEN with the
    default scopes (no token_scopes, no $RLHF_SERVE_TOKEN_SCOPES); a SQLite store."""
    import yaml
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cluster.serve.launch import deploy, load_serve_config

    tmp = tmp_path_factory.mktemp("policy")
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "tokens.yaml").write_text(yaml.safe_dump({
        "app": {"token": GEN, "scopes": ["generate"]}, "annotator": {"token": ANNOTATOR, "scopes": ["feedback"]},
        "ops": {"token": OPS, "scopes": ["promote"]}, "trainer": {"token": SCORER, "scopes": ["score"]},
        "reader": {"token": READER, "scopes": ["read"]}, "admin": {"token": ADMIN, "scopes": ["admin"]}}))
    sft, rm = builtin_sft_rm
    v2 = tmp / "pol_v2"  # the SFT policy with perturbed weights: another policy of the same architecture
    model = AutoModelForCausalLM.from_pretrained(sft)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(v2)
    AutoTokenizer.from_pretrained(sft).save_pretrained(v2)
    registry = FileRegistry(tmp / "registry")
    registry.register(make_entry(sft, run="t", kind="policy", stage="sft", id="pol-v1"))
    registry.register(make_entry(v2, run="t", kind="policy", stage="ppo", step=5, id="pol-v2"))
    registry.register(make_entry(rm, run="t", kind="reward", stage="reward", id="rm"))
    registry.promote("pol-v1")
    registry.promote("rm")
    store_path = tmp / "feedback.sqlite3"
    common = {"registry": str(tmp / "registry"), "token_file": str(tmp / "token"),
              "tokens_file": str(tmp / "tokens.yaml")}
    port = free_port()
    deploy(load_serve_config(), http_port=port, only=["policy", "feedback", "checkpoints"], arg_overrides={
        "policy": {**common, "feedback": str(store_path), "max_model_len": 256},
        "feedback": {"feedback": str(store_path), "token_file": common["token_file"],
                     "tokens_file": common["tokens_file"], "rounds": {"overrides": [
                         f"registry={tmp / 'registry'}", f"output_dir={tmp / 'rounds'}",
                         f"builtin.cache_dir={builtin_assets.root.parent}"]}},
        "checkpoints": {**common, "checkpoint_roots": [str(tmp), str(builtin_assets.root.parent)]},
    })
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=120) as client:
        yield {"client": client, "base": base, "store": F.open_feedback_store(store_path), "registry": registry,
               "tmp": tmp, "store_path": store_path}
    serve.shutdown()


def openai_client(loop, token=GEN):
    from openai import OpenAI

    return OpenAI(base_url=loop["base"] + "/policy/v1", api_key=token, max_retries=0, timeout=120)


def chat(loop, **kw) -> dict:
    r = loop["client"].post("/policy/v1/chat/completions", headers=auth(GEN), json={
        "model": "policy", "messages": PROMPT, "max_tokens": 12, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_openai_client_chats_and_every_answer_is_kept(loop):
    import openai

    client, store = openai_client(loop), loop["store"]
    raw = client.chat.completions.with_raw_response.create(model="policy", messages=PROMPT, n=2, max_tokens=12,
                                                           temperature=1.0, seed=3)
    r = raw.parse()
    assert raw.headers["x-answer-id"] == r.id and raw.headers["x-policy-version"] == "pol-v1"
    kept = store.get_answer(r.id)
    assert kept["prompt"] == PROMPT and kept["kind"] == "chat"
    assert kept["responses"] == [c.message.content for c in r.choices] and len(kept["responses"]) == 2
    assert kept["sampling"] == {"n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 3}
    assert kept["policy"]["id"] == "pol-v1" and kept["policy"]["path"] == str(loop["registry"].get("pol-v1").path)

    # streaming: the deltas put together are the response kept
    chunks = list(client.chat.completions.create(model="policy", messages=PROMPT, max_tokens=12, stream=True,
                                                 temperature=1.0, seed=4))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert store.get_answer(chunks[0].id)["responses"] == [text]

    comp = client.completions.create(model="policy", prompt="Hello", max_tokens=8, temperature=0.0)
    kept = store.get_answer(comp.id)
    assert kept["kind"] == "completion" and kept["responses"] == [comp.choices[0].text]
    assert [m.id for m in client.models.list().data] == ["policy"]

    with pytest.raises(openai.NotFoundError):   # another model name: vLLM's 404
        client.chat.completions.create(model="gpt-4", messages=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "fruit " * 400}],
                                       max_tokens=4)
    with pytest.raises(openai.PermissionDeniedError):  # a token without the "generate" scope
        openai_client(loop, ANNOTATOR).chat.completions.create(model="policy", messages=PROMPT, max_tokens=4)
    assert loop["client"].post("/policy/v1/chat/completions", json={"model": "policy", "messages": PROMPT}
                               ).status_code == 401
    r = loop["client"].post("/policy/v1/chat/completions", headers=auth(GEN), json={"model": "policy", "messages": 3})
    assert r.status_code == 422 and "cannot read the request" in r.text


def test_each_token_reaches_only_its_routes(loop):
    """Scopes across the policy, feedback and checkpoints apps, each call answered before any work is done (403, or
    a cheap 200/404/422 once past auth). A "score" token (a trainer's) can neither chat nor promote nor read; a
    "feedback" token cannot read checkpoints, a "read" token can; the shared TOKEN, with no scopes configured, is
    a client's (generate, score, feedback): it lists models and sends feedback but cannot read checkpoints, promote,
    start rounds or export. The replicas' logs name the principals and where the shared token's scopes came from,
    and hold no token."""
    c = loop["client"]

    def error(method, path, token, **kw):
        r = c.request(method, path, headers=auth(token), **kw)
        return r.status_code, (r.json().get("error") if r.status_code == 403 else None)

    def lacks(scope):
        return 403, f"this token lacks the {scope!r} scope"

    chat_body = {"json": {"model": "policy", "messages": PROMPT, "max_tokens": 4}}
    assert error("POST", "/policy/v1/chat/completions", SCORER, **chat_body) == lacks("generate")
    assert error("POST", "/v1/checkpoints/pol-v1/promote", SCORER) == lacks("promote")
    assert error("GET", "/v1/checkpoints", SCORER) == lacks("read")
    assert error("POST", "/v1/feedback", SCORER, json={"type": "vote"}) == lacks("feedback")
    assert error("GET", "/v1/checkpoints/pol-v1", ANNOTATOR) == lacks("read")
    assert error("GET", "/v1/checkpoints/pol-v1/files/config.json", ANNOTATOR) == lacks("read")
    assert error("GET", "/v1/checkpoints/pol-v1", READER) == (200, None)
    assert error("GET", "/v1/checkpoints/pol-v1/files/config.json", READER) == (200, None)
    assert error("POST", "/v1/checkpoints/pol-v1/promote", READER) == lacks("promote")

    assert error("GET", "/policy/v1/models", TOKEN) == (200, None)
    assert error("POST", "/v1/feedback", TOKEN, json={"type": "vote"}) == (422, None)  # past auth: a bad body
    assert error("GET", "/v1/checkpoints", TOKEN) == lacks("read")
    assert error("POST", "/v1/checkpoints/pol-v1/promote", TOKEN) == lacks("promote")
    assert error("DELETE", "/v1/checkpoints/pol-v1", TOKEN) == lacks("promote")
    assert error("POST", "/v1/feedback/rounds", TOKEN) == lacks("promote")
    assert error("GET", "/v1/feedback/export", TOKEN) == lacks("admin")
    assert error("GET", "/v1/feedback/export.parquet", TOKEN) == lacks("admin")
    for method, path in (("GET", "/v1/checkpoints"), ("GET", "/v1/feedback/rounds"), ("GET", "/policy/v1/models")):
        assert error(method, path, ADMIN) == (200, None), path  # admin: every scope

    line = ("rlhf-cluster feedback: principals admin [admin]; annotator [feedback]; app [generate]; ops [promote]; "
            "reader [read]; trainer [score]; shared [feedback, generate, score] (the shared token's scopes: the "
            "default: $RLHF_SERVE_TOKEN_SCOPES is unset)")
    log = serve_log_text(line)
    assert line in log
    assert not [t for t in (TOKEN, GEN, ANNOTATOR, OPS, SCORER, READER, ADMIN) if t in log]


def test_feedback_is_validated_stored_once_and_exported(loop):
    c = loop["client"]
    answer = chat(loop, n=2, temperature=1.0, seed=5)
    ref = {"answer_id": answer["id"]}
    body = {"type": "comparison", "chosen": {**ref, "choice": 0}, "rejected": {**ref, "choice": 1},
            "strength": "better", "annotator_note": "t1"}
    if answer["choices"][0]["message"]["content"] == answer["choices"][1]["message"]["content"]:
        body["rejected"] = {"response": "no."}
        body["prompt"] = PROMPT
    key = {"Idempotency-Key": f"k-{answer['id']}"}
    first = c.post("/v1/feedback", json=body, headers={**auth(ANNOTATOR), **key})
    assert first.status_code == 201, first.text
    record = first.json()
    assert record["chosen"]["answer_id"] == answer["id"] and record["chosen"]["policy"]["id"] == "pol-v1"
    assert (record["annotator"], record["annotator_note"]) == ("annotator", "t1")  # the token's principal, stamped
    again = c.post("/v1/feedback", json=body, headers={**auth(ANNOTATOR), **key})
    assert again.status_code == 200 and again.json()["id"] == record["id"]  # a retry stores nothing twice
    conflict = c.post("/v1/feedback", json={**body, "strength": "slightly_better"}, headers={**auth(ANNOTATOR), **key})
    assert conflict.status_code == 409 and "idempotency key" in conflict.json()["error"]

    bad = {
        "unknown answer": ({**body, "chosen": {"answer_id": "chatcmpl-nope"}}, 422, "no served answer"),
        "self-comparison": ({**body, "rejected": {**ref, "choice": 0}}, 422, "same response"),
        "choice out of range": ({**body, "chosen": {**ref, "choice": 7}}, 422, "choice"),
        "another prompt": ({**body, "prompt": "Count to 3.", "rejected": {"response": "1 2 3"}}, 422,
                           "another prompt"),
        "unknown type": ({"type": "vote"}, 422, "invalid request"),
        "annotator chosen by the client": ({**body, "annotator": "someone-else"}, 422, "set by the server"),
        "rating out of range": ({"type": "rating", "response": ref, "rating": 0}, 422, "invalid request"),
        "oversized": ({**body, "edited": "x" * (300 << 10)}, 413, "limit"),
    }
    for name, (payload, status, match) in bad.items():
        r = c.post("/v1/feedback", json=payload, headers=auth(ANNOTATOR))
        assert r.status_code == status and match in r.text, (name, r.status_code, r.text[:300])
    assert c.post("/v1/feedback", json=body).status_code == 401
    assert c.post("/v1/feedback", json=body, headers=auth(GEN)).status_code == 403  # generate scope only
    assert c.post("/v1/feedback", content=b'{"type": "compar', headers={**auth(ANNOTATOR),
                                                                         "Content-Type": "application/json"}
                  ).status_code == 422
    r = c.post("/v1/feedback", json={"type": "safety", "response": {**ref, "choice": 1}, "safe": False},
               headers=auth(ANNOTATOR))
    assert r.status_code == 201

    # export: every user's prompts and answers, so the admin's; preference rows in the reward stage's format, then
    # nothing new after the cursor
    for token in (ANNOTATOR, OPS):
        denied = c.get("/v1/feedback/export", headers=auth(token))
        assert denied.status_code == 403 and denied.json()["error"] == "this token lacks the 'admin' scope"
    r = c.get("/v1/feedback/export", headers=auth(ADMIN))
    rows = [json.loads(line) for line in r.text.splitlines()]
    mine = [row for row in rows if row["feedback_id"] == record["id"]]
    assert mine and mine[0]["chosen"] == [{"role": "assistant", "content": record["chosen"]["response"]}]
    assert mine[0]["prompt"] == PROMPT and mine[0]["strength"] == "better"
    cursor = r.headers["x-next-cursor"]
    assert c.get("/v1/feedback/export", params={"since": cursor}, headers=auth(ADMIN)).text == ""
    records = c.get("/v1/feedback/export", params={"format": "records"}, headers=auth(ADMIN)).text.splitlines()
    assert len(records) == loop["store"].count()
    import io

    import pyarrow.parquet as pq

    r = c.get("/v1/feedback/export.parquet", headers=auth(ADMIN))
    assert pq.read_table(io.BytesIO(r.content)).num_rows == len(rows)
    assert c.get("/v1/feedback/healthz").json()["records"] == loop["store"].count()


@pytest.mark.parametrize("prefix", ["/policy", "/v1/feedback"])
def test_schemathesis_finds_no_server_error(loop, prefix):
    """Requests generated from each app's own OpenAPI spec (vLLM's request models for the policy), valid and
    invalid, with an admin token: never a 5xx."""
    # POST /rounds would start a real round (minutes of training) in the background: its 4xx answers are tested
    # by hand (test_rounds_start_as_ray_jobs_one_at_a_time)
    errors, reached = schemathesis_run(loop["base"] + prefix, auth(ADMIN), max_examples=10, skip=("POST /rounds",))
    assert not errors, errors[:5]
    assert reached and sum(reached.values()) >= len(reached) // 2, reached


def test_redis_kill_during_feedback_ingestion_loses_no_acknowledged_record(loop, tmp_path):
    """A feedback app of its own on a real redis-server (AOF on, as deployed); four clients send comparisons while
    redis-server is killed with SIGKILL and restarted 1.5 s later. Every comparison answered 201 is in the export
    afterwards; during the outage the answer is a 503 naming the store (or the retry succeeds), never another 5xx."""
    from ray import serve

    from rlhf_cluster.serve.launch import build_application, run_application

    port = free_port()
    redis = {"proc": start_redis(port, tmp_path)}
    url = f"redis://127.0.0.1:{port}/0"
    run_application(build_application("rlhf_cluster.serve.feedback_app:app_builder", {
        "feedback": url, "token_file": str(loop["tmp"] / "token")}), "feedback_redis", "/fbredis")
    acked, others, stop = [], [], threading.Event()

    def client(worker: int):
        with httpx.Client(base_url=loop["base"], timeout=60) as c:
            i = 0
            while not stop.is_set():
                i += 1
                r = c.post("/fbredis", headers=auth(), json={
                    "type": "comparison", "prompt": f"prompt {worker}-{i}", "chosen": {"response": "yes"},
                    "rejected": {"response": "no"}})
                (acked if r.status_code == 201 else others).append((r.status_code, r.json()))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        before = len(acked)
        redis["proc"].kill()  # SIGKILL: no shutdown, no final AOF rewrite
        redis["proc"].wait(10)
        time.sleep(1.5)
        redis["proc"] = start_redis(port, tmp_path)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    try:
        stored = {r["id"] for r in F.read_all(F.open_feedback_store(url))}
        ids = [body["id"] for _, body in acked]
        assert before > 10 and len(acked) > before, (before, len(acked))  # ingestion went on after the restart
        assert set(ids) <= stored, f"{len(set(ids) - stored)} acknowledged records lost"
        assert all(status == 503 and "redis" in body["error"] for status, body in others), others[:3]
        print(f"\nredis kill: {len(acked)} acknowledged ({before} before the kill), {len(others)} answered 503")
    finally:
        serve.delete("feedback_redis")
        redis["proc"].kill()


def ask(client: httpx.Client, prompt: str, **kw) -> dict:
    r = client.post("/policy/v1/chat/completions", headers=auth(GEN), json={
        "model": "policy", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, **kw})
    assert r.status_code == 200, r.text
    return {**r.json(), "version": r.headers["x-policy-version"]}


def served_gold(client: httpx.Client, prompts: list[str]) -> tuple[float, float, set]:
    """Mean gold (and its standard error) of the served policy's greedy answers; the versions that answered."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: ask(client, p, temperature=0.0), prompts))
    gold = [task.gold_score(p, a["choices"][0]["message"]["content"]).total for p, a in zip(prompts, answers)]
    return statistics.fmean(gold), statistics.stdev(gold) / len(gold) ** 0.5, {a["version"] for a in answers}


def annotate(client: httpx.Client, prompts: list[str], rng: random.Random, noise: float = 0.1) -> dict:
    """Simulated annotators: for each prompt two sampled answers of the served policy, judged by the built-in task's
    hidden gold scorer (the decision flipped with probability `noise`), sent as a comparison with Llama 2's strength
    of the gold gap. Answers the scorer cannot tell apart are not sent."""
    sent = ties = 0
    for prompt in prompts:
        a = ask(client, prompt, n=2, temperature=1.0, seed=rng.randrange(1 << 30))
        texts = [c["message"]["content"] for c in a["choices"]]
        g = [task.gold_score(prompt, t).total for t in texts]
        if texts[0] == texts[1] or g[0] == g[1]:
            ties += 1
            continue
        best = int(g[1] > g[0])
        if rng.random() < noise:
            best = 1 - best
        r = client.post("/v1/feedback", headers={**auth(ANNOTATOR), "Idempotency-Key": f"{a['id']}-judged"}, json={
            "type": "comparison", "chosen": {"answer_id": a["id"], "choice": best},
            "rejected": {"answer_id": a["id"], "choice": 1 - best},
            "strength": task.preference_strength(abs(g[0] - g[1])), "annotator_note": "gold-with-noise"})
        assert r.status_code == 201, r.text
        sent += 1
    return {"sent": sent, "ties": ties}


def start_round(c) -> str:
    r = c.post("/v1/feedback/rounds", headers=auth(OPS))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_round(c, rid: str, timeout: float) -> dict:
    """The round's state once its job ended (GET /v1/feedback/rounds/{id}, every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(f"/v1/feedback/rounds/{rid}", headers=auth(OPS))
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return r.json()
        assert time.monotonic() < deadline, r.json()
        time.sleep(2)


def test_rounds_start_as_ray_jobs_one_at_a_time(loop):
    """POST /v1/feedback/rounds submits `python -m rlhf_cluster.feedback_round` (the app's round config, its
    feedback store) to the cluster's Jobs API and answers 202 with the job's id; a second start while it runs is a
    409; GET .../rounds/{id} follows it to its end and gives the round's summary and the tail of its log; DELETE
    stops one that has not ended. Here nothing was sent since the book's cursor: the job ends without training,
    saying so. Starting and stopping a round need the "promote" scope."""
    c = loop["client"]
    book = loop["tmp"] / "rounds"
    book.mkdir(exist_ok=True)
    records = F.read_all(loop["store"])
    (book / "rounds.json").write_text(json.dumps({"cursor": records[-1]["cursor"] if records else None,
                                                  "rounds": []}))
    assert c.post("/v1/feedback/rounds").status_code == 401
    denied = c.post("/v1/feedback/rounds", headers=auth(ANNOTATOR))
    assert denied.status_code == 403 and "promote" in denied.json()["error"]
    for body in ({"min_pairs": 0}, {"min_pairs": "many"}, {"min_pair": 1}, [1]):  # (schemathesis skips this route)
        bad = c.post("/v1/feedback/rounds", headers=auth(OPS), json=body)
        assert bad.status_code == 422, (body, bad.text)
        assert isinstance(body, list) or next(iter(body)) in bad.text, (body, bad.text)  # names the field
    assert c.post("/v1/feedback/rounds", headers={**auth(OPS), "Content-Type": "application/json"},
                  content=b"{not json").status_code in (400, 422)
    assert c.get("/v1/feedback/rounds", headers=auth(OPS)).json()["rounds"] == []  # none of those started one
    rid = start_round(c)
    busy = c.post("/v1/feedback/rounds", headers=auth(OPS))
    assert busy.status_code == 409 and rid in busy.json()["error"], busy.text
    state = wait_round(c, rid, 300)
    assert state["status"] == "SUCCEEDED", state["log_tail"]
    assert state["summary"] == {"id": rid, "ran": False, "round": 1, "records": 0, "pairs": 0}
    assert "fewer than min_pairs=8 new pairs: no round" in state["log_tail"]
    listed = c.get("/v1/feedback/rounds", headers=auth(OPS)).json()["rounds"]
    assert listed[0]["id"] == rid and listed[0]["status"] == "SUCCEEDED" and listed[0]["ended"]
    missing = c.get("/v1/feedback/rounds/feedback-round-20260101-000000-abcdef", headers=auth(OPS))
    assert missing.status_code == 404 and "no feedback round" in missing.json()["error"]
    assert c.get("/v1/feedback/rounds/not-a-round", headers=auth(OPS)).status_code == 422
    # DELETE stops a round that has not ended: the job is STOPPED, nothing was booked
    ended = c.delete(f"/v1/feedback/rounds/{rid}", headers=auth(OPS))
    assert ended.status_code == 409 and "already ended" in ended.json()["error"]
    assert c.delete("/v1/feedback/rounds/feedback-round-20260101-000000-abcdef", headers=auth(OPS)).status_code == 404
    assert c.delete(f"/v1/feedback/rounds/{rid}", headers=auth(ANNOTATOR)).status_code == 403
    second = start_round(c)
    stopping = c.delete(f"/v1/feedback/rounds/{second}", headers=auth(OPS))
    assert stopping.status_code == 202 and stopping.json() == {"id": second, "status": "STOPPING"}
    assert wait_round(c, second, 120)["status"] == "STOPPED"
    assert json.loads((book / "rounds.json").read_text())["rounds"] == []


def test_every_rounds_call_is_503_when_the_jobs_api_stops_answering(loop):
    """A failing Jobs API is the cluster's fault, not the request's: once the app has reached the dashboard and it
    stops answering, each Rounds call (list, start, get, stop: the four routes) raises JobsUnavailable naming the
    call, which the routes answer as 503 (never 500); on a live API an unknown id is None (404)."""
    from rlhf_cluster.serve.feedback_app import JobsUnavailable, RoundArgs, Rounds

    rounds = Rounds(RoundArgs(), str(loop["store_path"]))
    assert rounds.list() is not None and rounds.get("feedback-round-20260101-000000-abcdef") is None
    rounds.client()._address = f"http://127.0.0.1:{free_port()}"  # the real client; nothing listens there now
    for call, args in (("list", ()), ("start", ()), ("get", ("feedback-round-20260101-000000-abcdef",)),
                       ("stop", ("feedback-round-20260101-000000-abcdef",))):
        with pytest.raises(JobsUnavailable, match=r"the Ray Jobs API failed \((list_jobs|get_job_info): "):
            getattr(rounds, call)(*args)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(2400)
def test_two_feedback_rounds_over_http_raise_the_served_policys_gold(loop, builtin_cfg):
    """The loop, only over HTTP: simulated annotators compare answers of the served policy (POST /v1/feedback); the
    operator starts a feedback round (POST /v1/feedback/rounds: a Ray job that continues the reward model on the
    comparisons, runs a rejection-sampling round from the served policy and promotes) and follows it to its end; the
    policy app swaps the result in; the served policy's test gold is measured over HTTP (greedy answers of the 46
    test prompts). Twice; then a round with nothing new trains nothing."""
    client, splits, rng = loop["client"], task.split_prompts(builtin_cfg.seed), random.Random(0)
    # the rounds start from now: the earlier tests' feedback in this store is not theirs
    earlier = F.read_all(loop["store"])
    (loop["tmp"] / "rounds").mkdir(exist_ok=True)
    (loop["tmp"] / "rounds" / "rounds.json").write_text(json.dumps({
        "cursor": earlier[-1]["cursor"] if earlier else None, "rounds": []}))
    gold = [served_gold(client, splits["test"])]
    assert gold[0][2] == {"pol-v1"}
    for number in (1, 2):
        counts = annotate(client, rng.sample(splits["train"], 80), rng)
        state = wait_round(client, start_round(client), 1500)
        assert state["status"] == "SUCCEEDED", state["log_tail"]
        summary = state["summary"]
        assert summary["ran"] and summary["round"] == number and summary["pairs"] == counts["sent"]
        assert summary["pairs_heldout"] > 0 and 0 <= summary["heldout_feedback_accuracy"]["after"] <= 1
        deadline = time.monotonic() + 300  # the policy app follows the promotion (load, probe, swap)
        while client.get("/policy/healthz").json()["version"]["id"] != summary["policy_entry"]:
            assert time.monotonic() < deadline, client.get("/policy/healthz").json()
            time.sleep(2)
        gold.append(served_gold(client, splits["test"]))
        assert gold[-1][2] == {summary["policy_entry"]}
        assert loop["registry"].serving("reward").id == summary["reward_entry"]
        print(f"\nround {number}: {counts}, held-out feedback accuracy {summary['heldout_feedback_accuracy']}, "
              f"served test gold {gold[-2][0]:.3f} -> {gold[-1][0]:.3f}, {summary['seconds']} s")
    idle = wait_round(client, start_round(client), 300)
    assert idle["status"] == "SUCCEEDED" and not idle["summary"]["ran"]  # nothing new since round 2: no round
    # over two rounds the served policy's test gold rises by more than 0.08: above two standard errors of the
    # 46-prompt mean (~0.04-0.06) and the seed-to-seed std of one rejection-sampling round's gold (0.054, 3 seeds:
    # docs/results.md); measured with the rounds run in-process, seed 0: 0.669 -> 0.807 -> 0.828
    assert gold[2][0] > gold[0][0] + 0.08, gold


def test_a_promotion_under_concurrent_chats_fails_none(loop):
    """Six clients chat without pause while the operator promotes pol-v2 through the checkpoints app: the policy app
    loads it in a second engine, probes it and swaps it in. No request fails; every answer names the version that
    gave it, the one served before (the last feedback round's, or pol-v1 without them) until the swap and pol-v2
    after the promotion returned. A broken policy is refused (409) and the pointer stays. Bounded: at most 6
    requests in flight, loopback only."""
    c = loop["client"]
    before = c.get("/policy/healthz").json()["version"]["id"]
    assert before != "pol-v2"
    swaps = c.get("/policy/healthz").json()["swaps"]
    r = c.post("/v1/checkpoints/pol-v2/promote", headers=auth(GEN))  # reading needs "read", promoting "promote"
    assert r.status_code == 403 and "promote" in r.json()["error"]
    assert c.get("/v1/checkpoints/pol-v2", headers=auth(GEN)).status_code == 403
    assert c.get("/v1/checkpoints/pol-v2", headers=auth(READER)).status_code == 200
    results, stop = [], threading.Event()

    def client():
        with httpx.Client(base_url=loop["base"], timeout=120) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                r = http.post("/policy/v1/chat/completions", headers=auth(GEN), json={
                    "model": "policy", "messages": PROMPT, "max_tokens": 8})
                results.append((t0, r.status_code, r.headers.get("x-policy-version"), r.text[:200]))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        r = c.post("/v1/checkpoints/pol-v2/promote", headers=auth(OPS))
        promoted_at = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["policy_app"]["ok"] and r.json()["policy_app"]["version"]["id"] == "pol-v2"
        # the clients go on until 6 requests sent after the promotion returned have been answered (a fixed 3 s saw
        # only one on a loaded machine), at most 120 s
        deadline = time.monotonic() + 120
        while sum(t0 > promoted_at for t0, *_ in list(results)) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    failed = [x for x in results if x[1] != 200]
    assert not failed, failed[:3]
    assert {v for _, _, v, _ in results} == {before, "pol-v2"}
    assert all(v == "pol-v2" for t0, _, v, _ in results if t0 > promoted_at)
    assert sum(t0 > promoted_at for t0, *_ in results) > 5
    health = c.get("/policy/healthz").json()
    assert health["version"]["id"] == "pol-v2" and health["swaps"] == swaps + 1
    assert loop["registry"].serving("policy").id == "pol-v2"

    broken = loop["tmp"] / "pol_broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 0}')
    loop["registry"].register(make_entry(broken, run="t", kind="policy", stage="ppo", id="pol-broken"))
    r = c.post("/v1/checkpoints/pol-broken/promote", headers=auth(OPS))
    assert r.status_code == 409 and "could not load" in r.json()["error"], r.text
    assert loop["registry"].serving("policy").id == "pol-v2" and chat(loop)["model"] == "policy"
    assert c.get("/policy/healthz").json()["version"]["id"] == "pol-v2"
