"""What a client may send and what it gets back when something is wrong: the request bodies, with a bound on every
field, validated at the door; OpenAI's error shape; and the engine's error types mapped to statuses (by type,
never by the words of a message)."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Annotated, Literal, Optional, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from engine import SamplingParams
from engine.errors import InvalidRequest, NoCapacity, PromptTooLong, SessionBusy, SessionClosed
from engine.llm import ENGINE_DEFAULT
from engine.tokenizer import check_text
from snapkv.config import SnapKVConfig

SNAPKV_FIELDS = tuple(f.name for f in fields(SnapKVConfig))
MAX_STOP = 4  # as OpenAI: each stop string is matched against the text after every token
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256
INT32 = 2**31
SESSION_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"

# engine errors -> (status, code); anything else the engine refuses is a 400 "invalid_value"
ENGINE_ERRORS = ((PromptTooLong, 400, "context_length_exceeded"), (NoCapacity, 503, "no_capacity"),
                 (SessionBusy, 409, "session_busy"), (SessionClosed, 409, "session_closed"))


class APIError(Exception):
    TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
             429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return AsciiJSON(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def of(cls, error: ValueError, param: str | None = None) -> APIError:
        """An engine refusal as the client sees it: its type decides the status."""
        status, code = next(((s, c) for kind, s, c in ENGINE_ERRORS if isinstance(error, kind)), (400, "invalid_value"))
        retry = {"retry-after": "1"} if status == 503 else None  # capacity: a slot frees within a few steps
        return cls(status, str(error), getattr(error, "param", None) or param, code, retry)


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: a message that quotes client text (a lone surrogate, say)
    still encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of problems as one OpenAI-style 400 that names the first field at fault."""
    errors = exc.errors()
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # of a union's members, the one that got furthest
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not union_member(part)]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", None, "invalid_json")
    param = ".".join(loc) or None
    what = f"field {param!r}" if param else "the request body"
    return APIError(400, f"{what}: {first.get('msg')}", param, "invalid_value")


def union_member(part) -> bool:
    """Whether a part of pydantic's error location names a union's member ("str", "list[constrained-str]"), not a
    field."""
    return isinstance(part, str) and (part in ("str", "int", "bool", "float", "dict", "list") or "[" in part or
                                      "-" in part)


def valid_text(text: str, param: str) -> str:
    """Text the tokenizer can take (valid Unicode), or a 400 naming the field."""
    try:
        check_text(text, param)
    except InvalidRequest as e:
        raise APIError(400, str(e), param, "invalid_value") from None
    return text


StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Body(BaseModel):
    """What /v1/chat/completions and /v1/completions share. Unknown fields are ignored, as OpenAI's clients send
    some that do not apply; fields whose meaning we cannot honour are refused (n > 1, logprobs)."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = Field(None, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, lt=INT32)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, lt=INT32)  # and at most the vocabulary (the engine says so)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Optional[Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP)]]] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    logprobs: Optional[Union[bool, Annotated[int, Field(ge=0, le=20)]]] = None
    snapkv: Optional[Union[bool, dict]] = None
    return_kept: bool = False  # the final snapkv object then carries `kept` (kept_view.kept_data)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for i, s in enumerate(stop):
            valid_text(s, f"stop.{i}" if isinstance(self.stop, list) else "stop")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                                  top_p=self.top_p, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)
        except InvalidRequest as e:
            raise APIError.of(e) from None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[dict], Field(max_length=MAX_CONTENT_PARTS)]]

    def text(self, index: int) -> str:
        param = f"messages.{index}.content"
        if isinstance(self.content, str):
            return valid_text(self.content, param)
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param, "invalid_value")
            parts.append(valid_text(part["text"], param))
        return "".join(parts)


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=1, lt=INT32)
    session_id: Optional[str] = Field(None, min_length=1, max_length=128, pattern=SESSION_ID)
    new_session: bool = False  # open a conversation under an id the server makes (unguessable), sent back


class CompletionBody(Body):
    prompt: Union[str, list[int], Annotated[list[str], Field(max_length=1)]]
    echo: bool = False


def request_snapkv(field, engine_default: SnapKVConfig | None):
    """The body's "snapkv" field as the engine takes it: absent or true -> the server's settings; false -> the
    full cache; an object -> those settings, the ones it leaves out taken from the server's (or the defaults)."""
    if field is None or field is True:
        return ENGINE_DEFAULT
    if field is False:
        return None
    unknown = sorted(set(field) - set(SNAPKV_FIELDS))
    if unknown:
        name = unknown[0][:64]
        raise APIError(400, f"unknown snapkv setting {name!r}; known: {', '.join(SNAPKV_FIELDS)}",
                       f"snapkv.{name}", "invalid_value")
    base = engine_default or SnapKVConfig()
    values = {f.name: getattr(base, f.name) for f in fields(SnapKVConfig)} | field
    for name in ("budget", "window", "kernel"):
        if not isinstance(values[name], int) or isinstance(values[name], bool):
            raise APIError(400, f"snapkv.{name} must be an integer", f"snapkv.{name}", "invalid_value")
    try:
        return SnapKVConfig(**values)
    except (ValueError, TypeError) as e:  # SnapKVConfig's own validation: bounds, choices, budget > window
        raise APIError(400, f"snapkv: {e}", "snapkv", "invalid_value") from None
