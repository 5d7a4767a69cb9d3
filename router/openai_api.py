"""The router's public protocol: OpenAI request bodies (pydantic), and their translation to the
workers' ``SamplingParams`` (the workers' own protocol is ``splitserve.protocol``).

Unknown fields are refused (like OpenAI's "Unrecognized request argument"), and fields we accept
but do not implement (penalties, logprobs) are refused when set to anything but their no-op
value, so a client never gets silently different behaviour from what it asked for.

Types are strict (``STRICT``): "10" or true is not a number and "yes" is not a boolean (lax
coercion would accept what the client did not mean), an integer is accepted where a number is
expected (as OpenAI does), NaN and infinities are refused. Every value the workers receive is
within what the engine takes (the seed fits torch's generator, token ids the vocabulary), so a
bad request is a 400 here and never an exception inside a worker; what needs the model (the
vocabulary, the context length) is checked by ``check_token_ids`` and choices.token_limits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from splitserve.protocol import MAX_LOGPROBS, SamplingParams
from splitserve.router.errors import bad_request

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_SEED = 2**63 - 1  # torch's generator takes 64 bits; a signed 64-bit integer is portable JSON
MAX_INT32 = 2**31 - 1
MAX_STOP_CHARS = 1024  # the router holds back up to this much text per choice while matching
MAX_STOP_TOKEN_IDS = 256
NonNegativeInt = Annotated[int, Field(ge=0)]


class FieldError(ValueError):
    """A check that spans fields (in a model validator, where pydantic records no location)
    still names the field the client must change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = STRICT

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, le=MAX_INT32)  # at or above the vocabulary size: no top-k
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegativeInt] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("max_tokens")
    @classmethod
    def _positive_max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise FieldError(name, f"{name} is not supported yet (only 0)")
        if self.logit_bias:
            raise FieldError("logit_bias", "logit_bias is not supported yet")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, index: int) -> SamplingParams:
        """The sampling parameters of choice ``index`` (seeds differ per choice, else n copies
        of one sample; they wrap around so every one stays within ``MAX_SEED``). A value the
        engine cannot run is a 400 here, not a worker's."""
        seed = None if self.seed is None else (self.seed + index) % (MAX_SEED + 1)
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                seed=seed, stop=tuple(self.stop_list), stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos, logprobs=self.num_logprobs,
            )
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    def sampling(self, max_tokens: int, index: int) -> dict[str, Any]:
        """The JSON of ``sampling_params``, as it goes to the workers."""
        return self.sampling_params(max_tokens, index).to_json()

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives per token the request wants logprobs for (None: off)."""
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise FieldError("logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if self.echo:
            raise FieldError("echo", "echo is not supported yet")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise FieldError("best_of", "best_of other than n is not supported")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise FieldError("prompt", "prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string, one token list, or a batch of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(STRICT, extra="allow")  # name, tool_call_id...: passed to the template
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "".join(part.text for part in self.content)
        out.setdefault("content", "")
        return out


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise FieldError("top_logprobs", f"top_logprobs must be between 0 and {MAX_LOGPROBS}")
        if self.tools:
            raise FieldError("tools", "tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise FieldError("response_format", "response_format other than text is not supported")
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise FieldError(
                    "max_completion_tokens", f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}"
                )
            if self.max_tokens is None:
                self.max_tokens = self.max_completion_tokens
        return self


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence (and the offending param) from pydantic's error list."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}", None
    if loc == [] and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return "request body must be a JSON object (Content-Type: application/json)", None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", loc[0] if loc else None
    if first.get("type") == "missing":
        return f"missing required parameter: {'.'.join(loc)}", loc[0] if loc else None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    error = first.get("ctx", {}).get("error")
    if not loc and isinstance(error, FieldError):
        loc = [error.param]
    param = ".".join(loc) or None
    return (f"{param}: {msg}" if param else msg), (loc[0] if loc else None)


def check_model(requested: str, served: str) -> None:
    if requested != served:
        err = bad_request(f"The model `{requested}` does not exist; this server serves `{served}`.", "model")
        err.status, err.code = 404, "model_not_found"
        raise err
