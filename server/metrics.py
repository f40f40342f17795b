"""The Prometheus series of /metrics, in a registry of their own (several servers may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("snapkv_requests", "Requests by final HTTP status (499: the client went away)",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("snapkv_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("snapkv_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("snapkv_requests_running", "Requests holding a cache slot", registry=r)
        self.waiting = Gauge("snapkv_requests_waiting", "Requests waiting for a slot", registry=r)
        self.free_slots = Gauge("snapkv_cache_slots_free", "Cache slots neither running a request nor held by a "
                                "conversation", registry=r)
        self.session_slots = Gauge("snapkv_cache_slots_sessions", "Cache slots held by conversations", registry=r)
        self.kv_bytes = Gauge("snapkv_kv_cache_kept_bytes", "KV bytes the running requests hold", registry=r)
        self.full_kv_bytes = Gauge("snapkv_kv_cache_full_equivalent_bytes",
                                   "KV bytes the running requests would hold with the full cache", registry=r)
        self.sessions = Gauge("snapkv_sessions_open", "Conversations (session_id) holding a cache slot", registry=r)
        self.session_kv_bytes = Gauge("snapkv_sessions_kv_bytes", "KV bytes the open conversations hold",
                                      registry=r)
        self.step_seconds = Histogram("snapkv_decode_step_seconds", "Time of one decode step (all live slots)",
                                      buckets=(.005, .01, .02, .04, .08, .15, .3, .6, 1.2, 2.5, 5), registry=r)
        self.ttft_seconds = Histogram("snapkv_time_to_first_token_seconds", "From arrival to the first token",
                                      buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320), registry=r)

    def record_load(self, load: dict) -> None:
        """The engine thread's view after each change (a scrape never waits for a step)."""
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        self.free_slots.set(load["free_slots"])
        self.session_slots.set(load["session_slots"])
        self.kv_bytes.set(load["kv_bytes"])
        self.full_kv_bytes.set(load["full_kv_bytes"])

    def record_sessions(self, count: int, kv_bytes: int) -> None:
        self.sessions.set(count)
        self.session_kv_bytes.set(kv_bytes)
