"""The errors a caller can cause or run into, by type, so that front ends map types (never message words) to
what they show: every one is a ValueError whose message says what to do, and `param` names the input at fault
where there is one."""

from __future__ import annotations


class EngineError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidRequest(EngineError):
    """Malformed input: token ids outside the vocabulary, text that is not valid Unicode, settings out of range."""


class PromptTooLong(EngineError):
    """The prompt and max_tokens do not fit the model's positions, a cache slot, or the memory its prefill needs."""


class NoCapacity(EngineError):
    """Nothing is wrong with the request, but the engine has no room for it now (every slot is held)."""


class SessionBusy(EngineError):
    """A conversation's previous turn is still running."""


class SessionClosed(EngineError):
    """The conversation was closed (or its turn aborted by closing it)."""


class EngineFailure(RuntimeError):
    """The engine itself has stopped (a tensor-parallel rank died): every later call fails with this."""
