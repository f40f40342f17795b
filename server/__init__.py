"""snapkv-serve: an OpenAI-compatible HTTP server over the engine's step loop.

    snapkv-serve --model weights/SmolLM2-135M-Instruct --port 8000 --max-batch-size 8 --budget 1024

One background thread runs the engine (engine_loop); the HTTP side (app) only bridges: validate the body
(schema), tokenize, add the request, relay its outputs as server-sent events or one JSON body (reply). Guards in
front of the routes check the Host header, the API keys and the body's size and read time; conversations by
`session_id` keep their compressed cache in a slot between requests (sessions); /metrics shows the engine's load
(metrics). The command and its flags are in command.
"""

from server.app import Limits, create_app
from server.command import main

__all__ = ["Limits", "create_app", "main"]
