"""The reward service's HTTP bodies: what /v1/score and /get_reward accept and answer, with the limits that keep one
request from holding a replica (rlhf_cluster/serve/reward_app.py serves them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ITEMS = 512          # items per request
MAX_CHARS = 16_384       # characters per string
MAX_MESSAGES = 32        # turns per conversation

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
