"""The request bodies (pydantic, extra='forbid': an unknown field is a 422 naming it). Field names follow
OpenAI's; the A3 extensions (top_k, order, group_size, speculative, threshold, model_stream) are extra
keys an OpenAI client sends with `extra_body=`."""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

Prompt = Union[str, List[str], List[int], List[List[int]]]
Order = Union[str, List[int]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class DecodeFields(Strict):
    """Sampling and A3 decoding fields shared by completions, chat and infill."""
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    seed: Optional[int] = None
    order: Order = Field("left_to_right", description="extension: an a3jax.decode order name, or (infill) one group id per blank token")
    group_size: Optional[int] = Field(None, ge=1, description="extension: tokens committed per step")
    speculative: int = Field(0, ge=0, description="extension: self-speculative draft block (0 = off)")
    threshold: Optional[float] = Field(None, gt=0.0, le=1.0, description="extension: dynamic orders")
    model_stream: Optional[Literal["query", "content"]] = Field(
        None, description="extension: decode with the query (A3) or content (causal LM) stream")


class CompletionRequest(DecodeFields):
    model: str
    prompt: Prompt
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(None, ge=0, le=1, description="the chosen tokens' log-probs only")
    echo: bool = False
    user: Optional[str] = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(DecodeFields):
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    user: Optional[str] = None


class InfillRequest(DecodeFields):
    """text with [MASK:n] blanks, or prefix + suffix + length (one blank of `length` tokens between)."""
    model: Optional[str] = None
    text: Optional[str] = None
    prefix: Optional[str] = None
    suffix: Optional[str] = None
    length: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    seed: int = 0
    n: int = Field(1, ge=1)


class ScoreRequest(Strict):
    model: Optional[str] = None
    input: Union[str, List[str]]
    grouping: str = Field("ar", description="a3jax.data.grouping strategy: ar, blocks:k, random:k, ...")
    seed: int = 0
