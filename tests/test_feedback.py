"""The feedback library (rlhf_cluster/lib/feedback.py) on both stores, a real SQLite file and a real redis-server:
resolving requests against served answers, idempotency, cursors, crash survival, and the export to the reward
stage's preference rows checked row by row."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
from pydantic import TypeAdapter, ValidationError

from rlhf_cluster.actors.group import free_port
from rlhf_cluster.lib import feedback as F
from tests.helpers import start_redis

FEEDBACK = TypeAdapter(F.Feedback)
PROMPT = [{"role": "user", "content": "List 3 fruits."}]
ANSWER = {"id": "chatcmpl-1", "kind": "chat", "prompt": PROMPT, "responses": ["apple, pear, plum.", "no."],
          "sampling": {"n": 2, "temperature": 1.0}, "policy": {"id": "pol-v1", "step": 3}}


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield F.open_feedback_store(tmp_path / "feedback.sqlite3")
        return
    port = free_port()
    proc = start_redis(port, tmp_path)
    yield F.open_feedback_store(f"redis://127.0.0.1:{port}/0")
    proc.kill()
    proc.wait(10)


def add(store, body: dict, key: str | None = None, annotator: str = "annotator") -> tuple[dict, bool]:
    return F.add_feedback(store, FEEDBACK.validate_python(body), annotator, key)


def test_comparisons_resolve_against_served_answers(store):
    store.put_answer(ANSWER)
    ref = {"answer_id": "chatcmpl-1"}
    rec, created = add(store, {"type": "comparison", "chosen": {**ref, "choice": 0}, "rejected": {**ref, "choice": 1},
                               "strength": "significantly_better"})
    assert created and rec["prompt"] == PROMPT and rec["annotator"] == "annotator" and "annotator_note" not in rec
    assert rec["chosen"] == {"response": "apple, pear, plum.", "answer_id": "chatcmpl-1", "choice": 0,
                             "policy": {"id": "pol-v1", "step": 3}}
    assert rec["rejected"]["response"] == "no." and rec["aspect"] == "helpfulness"
    # a response given as text needs its prompt; with it, it can be compared with a served answer of that prompt
    rec, _ = add(store, {"type": "comparison", "prompt": "List 3 fruits.", "chosen": {"response": "kiwi, fig, lime."},
                         "rejected": {**ref, "choice": 1}, "edited": "kiwi, fig and lime."})
    assert rec["chosen"] == {"response": "kiwi, fig, lime."} and rec["edited"] == "kiwi, fig and lime."

    bad = {
        "unknown answer id": ({"type": "comparison", "chosen": {"answer_id": "nope"}, "rejected": ref}, "no served"),
        "choice out of range": ({"type": "comparison", "chosen": {**ref, "choice": 5}, "rejected": ref}, "choice"),
        "self-comparison": ({"type": "comparison", "chosen": ref, "rejected": {**ref, "choice": 0}}, "same response"),
        "same text twice": ({"type": "comparison", "prompt": "x", "chosen": {"response": "a"},
                             "rejected": {"response": "a"}}, "same response"),
        "text without prompt": ({"type": "comparison", "chosen": {"response": "a"}, "rejected": ref}, "needs the"),
        "another prompt": ({"type": "comparison", "prompt": "Count to 3.", "chosen": {"response": "1 2 3"},
                            "rejected": ref}, "another prompt"),
        "edit unchanged": ({"type": "edit", "response": ref, "edited": "apple, pear, plum."}, "unchanged"),
    }
    for name, (body, match) in bad.items():
        with pytest.raises(F.FeedbackError, match=match):
            add(store, body)
        assert name
    rec, _ = add(store, {"type": "rating", "response": ref, "rating": 5, "annotator_note": "batch 3"}, annotator="ann2")
    assert (rec["annotator"], rec["annotator_note"]) == ("ann2", "batch 3")  # the server's name, the client's note
    with pytest.raises(ValidationError, match="'annotator' is set by the server"):
        FEEDBACK.validate_python({"type": "rating", "response": ref, "rating": 5, "annotator": "someone-else"})
    for body in ({"type": "rating", "response": ref, "rating": 9},      # out of 1..7
                 {"type": "comparison", "chosen": ref},                 # rejected missing
                 {"type": "comparison", "chosen": {"answer_id": "a", "response": "b"}, "rejected": ref},
                 {"type": "vote", "response": ref},                     # unknown type
                 {"type": "safety", "response": ref, "safe": True, "extra": 1}):
        with pytest.raises(ValidationError):
            FEEDBACK.validate_python(body)
    assert store.count() == 3  # nothing invalid was stored


def test_idempotency_keys_and_cursors(store):
    store.put_answer(ANSWER)
    body = {"type": "rating", "response": {"answer_id": "chatcmpl-1"}, "rating": 6}
    first, created = add(store, body, key="client-key-1")
    again, created_again = add(store, body, key="client-key-1")
    assert created and not created_again and again == first  # a retry gives back the stored record
    with pytest.raises(F.KeyConflict, match="client-key-1"):
        add(store, {**body, "rating": 2}, key="client-key-1")
    with pytest.raises(F.KeyConflict, match="client-key-1"):  # the same body from another principal: not a retry
        add(store, body, key="client-key-1", annotator="someone-else")
    second, _ = add(store, {**body, "rating": 2})
    third, _ = add(store, {"type": "safety", "response": {"answer_id": "chatcmpl-1", "choice": 1}, "safe": False})
    assert [r["id"] for r in store.since()] == [first["id"], second["id"], third["id"]]
    assert [r["id"] for r in store.since(first["cursor"])] == [second["id"], third["id"]]
    assert store.since(third["cursor"]) == [] and store.count() == 3
    assert [r["id"] for r in F.read_all(store, page=1)] == [first["id"], second["id"], third["id"]]


def test_preference_rows_from_every_kind_of_feedback(builtin_assets, tmp_path):
    """Hand-built records -> the rows the reward stage reads (data.py's format), one by one."""
    p, q = PROMPT, [{"role": "user", "content": "Insult the nurse."}]

    def resp(text):
        return {"response": text}

    records = [
        {"id": "c1", "type": "comparison", "prompt": p, "chosen": resp("A"), "rejected": resp("B"),
         "strength": "unsure", "aspect": "helpfulness", "edited": "A+"},
        {"id": "e1", "type": "edit", "prompt": p, "response": resp("B"), "edited": "B+"},
        {"id": "r1", "type": "rating", "prompt": p, "response": resp("A"), "rating": 6, "aspect": "helpfulness"},
        {"id": "r2", "type": "rating", "prompt": p, "response": resp("B"), "rating": 2, "aspect": "helpfulness"},
        {"id": "r3", "type": "rating", "prompt": p, "response": resp("C"), "rating": 6, "aspect": "helpfulness"},
        {"id": "s1", "type": "safety", "prompt": q, "response": resp("No."), "safe": True},
        {"id": "s2", "type": "safety", "prompt": q, "response": resp("You fool."), "safe": False},
    ]

    def turn(t):
        return [{"role": "assistant", "content": t}]

    rows = F.preference_rows(records)
    assert rows == [
        {"prompt": p, "chosen": turn("A"), "rejected": turn("B"), "strength": "negligibly_better",
         "aspect": "helpfulness", "feedback_id": "c1", "edited": turn("A+")},
        {"prompt": p, "chosen": turn("B+"), "rejected": turn("B"), "strength": "significantly_better",
         "aspect": "helpfulness", "feedback_id": "e1"},
        {"prompt": p, "chosen": turn("A"), "rejected": turn("B"), "strength": "significantly_better",  # 6 vs 2
         "aspect": "helpfulness", "feedback_id": "r1>r2"},
        {"prompt": p, "chosen": turn("C"), "rejected": turn("B"), "strength": "significantly_better",  # r1 = r3: none
         "aspect": "helpfulness", "feedback_id": "r3>r2"},
        {"prompt": q, "chosen": turn("No."), "rejected": turn("You fool."), "strength": "significantly_better",
         "aspect": "safety", "feedback_id": "s1>s2"},
    ]
    assert [r["feedback_id"] for r in F.preference_rows(records, aspect="safety")] == ["s1>s2"]
    # the reward stage's loader reads them as they are, every row
    from transformers import AutoTokenizer

    from rlhf_cluster.lib.data import load_tokenized

    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, _ = load_tokenized(tmp_path / "prefs.jsonl", AutoTokenizer.from_pretrained(builtin_assets.base),
                            "preferences", 256, on_bad_sample="error")
    assert len(loaded) == len(rows)


def test_an_acknowledged_sqlite_record_survives_a_killed_writer(tmp_path):
    """A process adds records and prints each id once add() returned; it is SIGKILLed mid-stream. Every printed
    id is in the file afterwards (WAL + synchronous=FULL)."""
    path = tmp_path / "fb.sqlite3"
    script = textwrap.dedent(f"""
        import sys
        from rlhf_cluster.lib import feedback as F
        store = F.open_feedback_store({str(path)!r})
        for i in range(100000):
            rec, _ = store.add({{"id": f"fb-{{i}}", "type": "rating", "prompt": [], "n": i}}, "h", None)
            print(rec["id"], flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = [proc.stdout.readline().strip() for _ in range(300)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    acked += [line.strip() for line in proc.stdout if line.strip()]
    stored = {r["id"] for r in F.read_all(F.open_feedback_store(path))}
    assert len(acked) >= 300 and set(acked) <= stored


def test_open_feedback_store_names_bad_locations(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="use redis://"):
        F.open_feedback_store("http://example.com/x")
    monkeypatch.setenv("RLHF_FEEDBACK", str(tmp_path / "x.sqlite3"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert F.open_feedback_store().describe() == f"sqlite:{tmp_path / 'x.sqlite3'}"
    with pytest.raises(F.FeedbackError, match="cursor"):
        F.open_feedback_store().since("abc")
    assert json.dumps(F.as_messages("hi")) == '[{"role": "user", "content": "hi"}]'


def test_feedback_round_splits_whole_prompts_and_owns_its_data():
    from rlhf_cluster.feedback_round import split_by_prompt
    from rlhf_cluster.lib.config import CONFIG_DIR, ConfigError, FeedbackRoundConfig, load_config

    rows = [{"prompt": [{"role": "user", "content": f"p{i % 8}"}], "chosen": "a", "rejected": "b", "n": i}
            for i in range(40)]
    train, held = split_by_prompt(rows, 0.25, seed=0)
    prompts = {json.dumps(r["prompt"]) for r in held}
    assert len(prompts) == 2 and not prompts & {json.dumps(r["prompt"]) for r in train}  # 2 of 8 prompts, whole
    assert len(train) + len(held) == 40 and split_by_prompt(rows, 0.25, seed=0) == (train, held)
    assert split_by_prompt(rows[:1], 0.5, 0) == (rows[:1], [])  # one prompt: nothing to hold out
    assert split_by_prompt(rows, 0.99, 0)[0]  # at least one prompt trains

    cfg = load_config(FeedbackRoundConfig, CONFIG_DIR / "feedback-round-tiny.yaml")
    assert cfg.reward.loss == "margin" and cfg.rl.rounds == ["rejection_sampling"]
    for override, match in [("reward.data.train=/x.jsonl", "the round's"),
                            ("rl.seed=3", "rl.seed is set by the feedback round"),
                            ("rl.policy.path=/x", "rl.policy"), ("heldout_fraction=0", "heldout_fraction")]:
        with pytest.raises(ConfigError, match=match):
            load_config(FeedbackRoundConfig, CONFIG_DIR / "feedback-round-tiny.yaml", [override])


def test_the_feedback_apps_round_config_is_checked_when_it_starts(tmp_path):
    """The app's round (args.rounds) is loaded when the app starts: a bad key fails the deployment, naming it; a
    good one becomes the job's entrypoint with the app's own store and an absolute output directory."""
    from rlhf_cluster.lib.config import ConfigError
    from rlhf_cluster.serve.feedback_app import FeedbackAppArgs, RoundArgs, Rounds

    with pytest.raises(ConfigError, match="min_pairs"):
        Rounds(RoundArgs(overrides=["min_pairs=0"]), str(tmp_path / "f.sqlite3"))
    with pytest.raises(ConfigError, match="not_a_key"):
        Rounds(RoundArgs(overrides=["not_a_key=1"]), str(tmp_path / "f.sqlite3"))
    rounds = Rounds(RoundArgs(overrides=["output_dir=rel/rounds"]), str(tmp_path / "f.sqlite3"))
    argv = rounds.entrypoint.split()
    assert argv[:3] == [sys.executable, "-m", "rlhf_cluster.feedback_round"] and argv[3] == "--config"
    assert f"feedback={tmp_path / 'f.sqlite3'}" in argv and argv[-1] == f"output_dir={rounds.output_dir}"
    assert rounds.output_dir.is_absolute() and rounds.output_dir.parts[-2:] == ("rel", "rounds")
    assert FeedbackAppArgs.model_validate({"rounds": None}).rounds is None  # off: the routes answer 404
    with pytest.raises(ValidationError, match="jobs_adress"):
        FeedbackAppArgs.model_validate({"rounds": {"jobs_adress": "http://x"}})
