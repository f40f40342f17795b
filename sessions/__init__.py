"""sessions: conversations that keep their compressed cache in a slot between turns (ChatSession), on the engine's
public seams, and the continued prefill a later turn runs. Provides `llm.chat_session()` (`engine.wings`)."""

from engine import wings
from sessions.session import ChatSession

wings.provide("sessions", ChatSession)
