"""Loading and tokenising chat data (JSONL or Parquet, HF `messages` format) via `datasets`.

Record shapes (the same for user data and the built-in task):
    SFT / prompts:  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
                    (prompts also {"prompt": "text" or turns}, with an optional "label"; an HH transcript
                    string works for either)
    preferences:    {"prompt": [...], "chosen": [assistant turn], "rejected": [assistant turn],
                     optional "edited": [assistant turn], optional "strength": str}; prompt / chosen /
                    rejected may be strings, UltraFeedback's whole conversations, or (no prompt) two
                    Anthropic HH transcripts
The file's field names map onto these with `keys` (data.prompt_key, chosen_key, ...).

Tokenisation keeps the prompt/response boundary: every token an assistant wrote is marked
in `loss_mask`, so SFT trains on responses only (Llama 2) and PPO knows where the
response starts. Bad samples are skipped and counted (or raise, with on_bad_sample="error");
a file without a required field is an error naming the file and the field.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """Data that cannot be used, with the file, record and field named."""


@dataclass
class SkipReport:
    """Samples dropped while loading, by reason, with the first few record numbers of each."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, index: int) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(index)

    def __str__(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.kept} samples"
        parts = ", ".join(f"{n} {reason} (e.g. records {self.examples[reason]})"
                          for reason, n in sorted(self.skipped.items()))
        return f"{self.source}: {self.kept} samples kept, skipped {parts}"


class _BadSample(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def load_records(path: str | Path) -> Dataset:
    """A local JSONL (.jsonl/.json) or Parquet file as a `datasets.Dataset`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise DataError(f"data file {path}: unsupported extension {path.suffix!r} (use .jsonl or .parquet)")
    try:
        return load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several types
        raise DataError(f"data file {path} could not be parsed: {e}") from None


def _require_columns(ds: Dataset, columns: list, source: str) -> None:
    """Each entry a field name, or a tuple of names of which one must be present."""
    missing = [c for c in columns if not set(c if isinstance(c, tuple) else (c,)) & set(ds.column_names)]
    if missing:
        shown = ", ".join(" or ".join(map(repr, c)) if isinstance(c, tuple) else repr(c) for c in missing)
        raise DataError(f"{source}: records have no field {shown} (fields present: {ds.column_names})")


def _check_turns(turns, what: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise _BadSample(f"empty_{what}")
    for t in turns:
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            raise _BadSample(f"malformed_{what}")
    return turns


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to and including the assistant's turn marker."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): loss_mask is 1 on tokens an assistant wrote (incl. its end token).

    Rendered turn by turn, so multi-turn chats mask every user/system turn.
    """
    if messages and messages[0]["role"] == "assistant":  # chat templates cannot render an empty prefix
        raise DataError("the conversation starts with an assistant turn: it needs a user or system turn first")
    ids: list[int] = []
    mask: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if upto[: len(before)] != before or before[: len(ids)] != ids:
            raise DataError("the chat template does not render conversations prefix by prefix")
        mask += [0] * (len(before) - len(ids)) + [1] * (len(upto) - len(before))
        ids = upto
    return ids, mask


@dataclass
class Encoded:
    """One tokenised sample: full ids, the loss mask, and where the (first) response starts."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def response_start(self) -> int:
        return self.loss_mask.index(1)


def _encode_sft(tokenizer, rec: dict, max_tokens: int) -> Encoded:
    messages = _check_turns(rec.get("messages"), "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadSample("no_assistant_turn")
    if messages[0]["role"] == "assistant":
        raise _BadSample("assistant_turn_first")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise _BadSample("empty_response")
    ids, mask = encode_conversation(tokenizer, messages)
    if len(ids) > max_tokens:
        raise _BadSample("too_long")
    return Encoded(ids, mask)


def _encode_prompt_rec(tokenizer, rec: dict, max_tokens: int, require_label: bool = False) -> dict:
    """A prompt record: `messages` (a chat ending with a user turn) or `prompt` (a string: one user turn, or a
    chat), and optionally a `label`, a `level` and an `unsafe` flag."""
    turns = rec.get("messages") if rec.get("messages") is not None else rec.get("prompt")
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    messages = _check_turns(turns, "messages" if rec.get("messages") is not None else "prompt")
    if messages[-1]["role"] != "user":
        raise _BadSample("prompt_not_ending_with_user_turn")
    if not messages[-1]["content"].strip():
        raise _BadSample("empty_prompt")
    ids = encode_prompt(tokenizer, messages)
    if len(ids) > max_tokens:
        raise _BadSample("too_long")
    out = {"messages": messages, "prompt_ids": ids}
    label = rec.get("label")
    if label is not None:
        out["label"] = label
    elif require_label:
        raise _BadSample("missing_label")
    if rec.get("level") is not None:  # a difficulty or category (MATH's "level"): evaluations report per value
        out["level"] = rec["level"]
    if rec.get("unsafe"):  # a prompt flagged unsafe (Llama 2's rule, combine=llama2)
        out["unsafe"] = True
    return out


def _encode_pair(tokenizer, rec: dict, max_tokens: int) -> dict:
    prompt = _check_turns(rec.get("prompt"), "prompt")
    if prompt[0]["role"] == "assistant":
        raise _BadSample("assistant_turn_first")
    out = {"messages": prompt, "strength": rec.get("strength")}
    responses = {}
    for key in ("chosen", "rejected", "edited"):
        if key == "edited" and not rec.get("edited"):
            continue
        turns = _check_turns(rec.get(key), key)
        if not "".join(t["content"] for t in turns).strip():
            raise _BadSample("empty_response")
        responses[key] = turns
        ids, mask = encode_conversation(tokenizer, prompt + turns)
        if len(ids) > max_tokens:
            raise _BadSample("too_long")
        out[key] = Encoded(ids, mask)
    if responses["chosen"] == responses["rejected"]:
        raise _BadSample("identical_pair")
    return out


_ENCODERS = {
    "sft": (["messages"], _encode_sft),
    "prompts": ([("messages", "prompt")], _encode_prompt_rec),
    "preferences": (["chosen", "rejected"], _encode_pair),
}

# --------------------------------------------------------------------------- the shapes people's data has
# Every file is read through a key mapping (data.prompt_key, ...: the file's field for each name below) and
# brought to this module's shapes first: chat `messages` lists; prompt / chosen / rejected as strings, turn
# lists, or (UltraFeedback's binarized sets) whole conversations that repeat the prompt; Anthropic HH
# transcripts ("\n\nHuman: ... \n\nAssistant: ...") with no prompt field.
CANONICAL_KEYS = ("messages", "prompt", "chosen", "rejected", "label")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def is_transcript(text: str) -> bool:
    return "Human: " in text and bool(_HH_TURN.search("\n\n" + text.lstrip("\n")))


def parse_transcript(text: str) -> list[dict]:
    """An Anthropic HH transcript as chat turns (Human -> user, Assistant -> assistant); a transcript ending
    in "Assistant:" (a prompt) ends with an empty assistant turn."""
    text = re.sub(r"\n\nAssistant:\s*$", "\n\nAssistant: ", "\n\n" + text.lstrip("\n"))
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise _BadSample("malformed_transcript")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def _turns(value, role: str, what: str) -> list[dict]:
    """A string (one turn of `role`, or an HH transcript), or a list of turns, as turns."""
    if isinstance(value, str):
        return parse_transcript(value) if is_transcript(value) else [{"role": role, "content": value}]
    return _check_turns(value, what)


def _canonical(rec: dict, kind: str) -> dict:
    """A record (already renamed to CANONICAL_KEYS) in the shapes the encoders read."""
    out = dict(rec)
    if kind == "sft" and isinstance(rec.get("messages"), str):
        out["messages"] = parse_transcript(rec["messages"])
    if kind == "prompts":
        source = rec.get("messages") if rec.get("messages") is not None else rec.get("prompt")
        if isinstance(source, str) and is_transcript(source):
            turns = parse_transcript(source)
            out["messages"] = turns[:-1] if turns[-1]["role"] == "assistant" and not turns[-1]["content"] else turns
    if kind == "preferences":
        chosen, rejected = _turns(rec.get("chosen"), "assistant", "chosen"), _turns(rec.get("rejected"), "assistant",
                                                                                    "rejected")
        prompt = rec.get("prompt")
        if prompt is None:  # HH: two transcripts that differ in their last assistant turn
            if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
                raise _BadSample("transcripts_without_a_shared_prompt")
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        prompt = _turns(prompt, "user", "prompt")
        strip = len(prompt)  # UltraFeedback: chosen / rejected are whole conversations starting with the prompt
        chosen = chosen[strip:] if chosen[:strip] == prompt and len(chosen) > strip else chosen
        rejected = rejected[strip:] if rejected[:strip] == prompt and len(rejected) > strip else rejected
        out |= {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if isinstance(rec.get("edited"), str):
            out["edited"] = [{"role": "assistant", "content": rec["edited"]}]
    return out


def load_tokenized(path: str | Path, tokenizer, kind: str, max_tokens: int, on_bad_sample: str = "skip",
                   keys: dict[str, str] | None = None, **options) -> tuple[list, SkipReport]:
    """Load and tokenise a file of `kind` sft | prompts | preferences; returns (samples, report).
    `keys`: the file's field for each of CANONICAL_KEYS it names differently (data.prompt_key, ...);
    `options` go to the record encoder (prompts: require_label)."""
    columns, encode = _ENCODERS[kind]
    keys = {k: v for k, v in (keys or {}).items() if v != k}
    ds = load_records(path)
    source = str(path)
    _require_columns(ds, [tuple(keys.get(x, x) for x in c) if isinstance(c, tuple) else keys.get(c, c)
                          for c in columns], source)
    report = SkipReport(source)
    samples = []
    for i, rec in enumerate(ds):
        try:
            rec = _canonical({**rec, **{k: rec.get(v) for k, v in keys.items()}}, kind)
            samples.append(encode(tokenizer, rec, max_tokens, **options))
        except _BadSample as bad:
            if on_bad_sample == "error":
                raise DataError(f"{source}, record {i}: {bad.reason.replace('_', ' ')}") from None
            report.skip(bad.reason, i)
    report.kept = len(samples)
    if not samples:
        raise DataError(f"{source}: no usable samples ({report})")
    return samples, report


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) padded to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[row, sl] = torch.tensor(s, dtype=torch.long)
        att[row, sl] = 1
    return ids, att
