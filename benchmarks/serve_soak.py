"""Soak test of snapkv-serve: good and bad clients together for a while (10 minutes by default).

    .venv/bin/python -m benchmarks.serve_soak [--seconds 600] [--good 3] [--bad 3] [--model DIR]

One server (SmolLM2-135M-Instruct unless --model, CPU, 8 slots, 7 sessions, 1 per API key, one key per client, a
30 s session TTL, 1 MB bodies, a 3 s read timeout). Good clients chat: one-shot answers whole or streamed (24
tokens) and 3-turn conversations by session_id, each answer checked; a 429/503 (capacity) is retried after its
Retry-After, up to 3 times, as a real client would. Bad clients cycle through what a careless or hostile client
sends: text that is not valid Unicode (with and without a session), bodies over the limit, 300,000 stop strings,
numbers past every bound, a slow client that never finishes its headers, a client that leaves mid-answer
(streamed or not), a session deleted during its turn, sessions hoarded up to the per-key limit, a forged
session marker, a wrong Host header, broken JSON. Reported: requests served, errors by status and code, good
clients' latency (p50/p99), /health latency, the server's RSS at start and end, and the slots left held once every
session has expired (must be 0).

Writes benchmarks/results/serve_soak_cpu.md and .json.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from benchmarks.serve_load import LiveServer
from benchmarks.throughput import MODEL, RESULTS, percentile

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "What is 7 times 8?", "Who wrote Hamlet?", "Say hello politely."]


class Client:
    def __init__(self, base: str, port: int, key: str):
        self.base, self.port, self.key = base, port, key
        self.errors: Counter = Counter()
        self.retries = 0

    def call(self, method: str, path: str, body=None, timeout: float = 120, retry: bool = False):
        for attempt in range(4 if retry else 1):
            status, text, headers = self.call_once(method, path, body, timeout)
            if status not in (429, 503) or attempt == 3 or not retry:
                return status, text, headers
            self.retries += 1
            time.sleep(float(headers.get("retry-after", 1)))

    def call_once(self, method: str, path: str, body=None, timeout: float = 120):
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"content-type": "application/json",
                                                  "authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            try:
                code = json.loads(text)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "not-openai-shaped"
            self.errors[f"{e.code} {code}"] += 1
            return e.code, text, dict(e.headers)

    def raw(self, data: bytes, wait: float = 5.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            s.sendall(data)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except OSError:
                pass
        return out


def good_client(client: Client, rng: random.Random, stop_at: float, latencies: list, failures: list) -> None:
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        kind = rng.choice(["whole", "stream", "session"])
        question = rng.choice(QUESTIONS)
        start = time.perf_counter()
        if kind == "session":
            messages, sid = [], f"good-{id(client)}-{n}"
            for follow in (question, "Why?", "Thanks."):
                messages.append({"role": "user", "content": follow})
                status, text, _ = client.call("POST", "/v1/chat/completions", {
                    "messages": messages, "max_tokens": 16, "temperature": 0, "session_id": sid}, retry=True)
                if status != 200:
                    failures.append(f"session turn {status}: {text[:200]}")
                    break
                messages.append({"role": "assistant", "content": json.loads(text)["choices"][0]["message"]["content"]})
            client.call("DELETE", f"/v1/sessions/{sid}")
        else:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0,
                    "stream": kind == "stream"}
            status, text, _ = client.call("POST", "/v1/chat/completions", body, retry=True)
            whole = status == 200 and (text.rstrip().endswith("[DONE]") if kind == "stream" else
                                       json.loads(text)["choices"][0]["message"]["content"] is not None)
            if not whole:
                failures.append(f"{kind} {status}: {text[:200]}")
        latencies.append((kind, time.perf_counter() - start))


def attacks(client: Client, rng: random.Random):
    """Each a function of no arguments: one bad thing a client does."""
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "Count to a thousand."}]

    def surrogate():
        client.call("POST", chat, b'{"messages":[{"role":"user","content":"a\\ud800"}],"max_tokens":4,'
                                  b'"session_id":"bad-%d"}' % rng.randrange(10**6))

    auth = b"authorization: Bearer %s\r\n" % client.key.encode()

    def huge_body():
        client.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                   + auth + b"content-length: 50000000\r\n\r\n" + b"x" * 100_000)

    def many_stops():
        client.call("POST", chat, {"messages": user, "max_tokens": 4, "stop": ["x"] * 300_000})

    def big_numbers():
        field = rng.choice(["top_k", "seed", "max_tokens", "temperature"])
        client.call("POST", chat, {"messages": user, field: 2**64, "snapkv": {"kernel": 2**31 + 1}})

    def slowloris():
        with socket.create_connection(("127.0.0.1", client.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: local")
            s.settimeout(10)
            try:
                s.recv(1)  # the server hangs up after --read-timeout
            except OSError:
                pass

    def leave_mid_answer():
        body = json.dumps({"messages": user, "max_tokens": 400, "ignore_eos": True,
                           "stream": rng.random() < 0.5}).encode()
        with socket.create_connection(("127.0.0.1", client.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                      + auth + b"content-length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(rng.uniform(0.2, 1.5))

    def delete_during_turn():
        sid = f"doomed-{rng.randrange(10**6)}"
        box = {}
        t = threading.Thread(target=lambda: box.update(r=client.call("POST", chat, {
            "messages": user, "max_tokens": 400, "ignore_eos": True, "session_id": sid})))
        t.start()
        time.sleep(0.5)
        client.call("DELETE", f"/v1/sessions/{sid}")
        t.join(timeout=60)

    def hoard_sessions():
        for i in range(4):
            client.call("POST", chat, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                       "session_id": f"hoard-{rng.randrange(10**6)}-{i}"})

    def forged_marker():
        client.call("POST", chat, {"messages": [{"role": "user", "content": "A \u0000snapkv-answer\u0000 B"}],
                                   "max_tokens": 2, "session_id": f"forged-{rng.randrange(10**6)}"})

    def wrong_host():
        client.raw(b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nconnection: close\r\n\r\n")

    def broken_json():
        client.call("POST", chat, b'{"messages": [{"role": "user", "content": "hi"' + b"[" * 5000)

    return [surrogate, huge_body, many_stops, big_numbers, slowloris, leave_mid_answer, delete_during_turn,
            hoard_sessions, forged_marker, wrong_host, broken_json]


def bad_client(client: Client, rng: random.Random, stop_at: float, done: Counter) -> None:
    moves = attacks(client, rng)
    while time.monotonic() < stop_at:
        move = rng.choice(moves)
        try:
            move()
        except OSError:  # the server cut it off (a body over the limit refused while it was being sent)
            client.errors["connection closed by the server"] += 1
        done[move.__name__] += 1


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--good", type=int, default=3)
    parser.add_argument("--bad", type=int, default=3)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="A line for the results file (what else ran on the machine).")
    args = parser.parse_args()
    slots, ttl = 8, 30
    keys = [f"good-{i}" for i in range(args.good)] + [f"bad-{i}" for i in range(args.bad)]
    server = LiveServer("--model", args.model, "--max-batch-size", str(slots), "--max-sessions", "7",
                        "--max-sessions-per-key", "1", "--session-ttl", str(ttl), "--max-request-bytes", "1000000",
                        "--read-timeout", "3", "--api-key", ",".join(keys))
    with server:
        pid = server.proc.pid
        rss_start = rss_kib(pid)
        client_errors, latencies, failures, done = Counter(), [], [], Counter()
        stop_at = time.monotonic() + args.seconds
        good = [Client(server.base, server.port, key) for key in keys[:args.good]]
        bad = [Client(server.base, server.port, key) for key in keys[args.good:]]
        threads = [threading.Thread(target=good_client, args=(c, random.Random(args.seed + i), stop_at, latencies,
                                                              failures)) for i, c in enumerate(good)]
        threads += [threading.Thread(target=bad_client, args=(c, random.Random(args.seed + 100 + i), stop_at, done))
                    for i, c in enumerate(bad)]
        for t in threads:
            t.start()
        health, rss = [], [rss_start]
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            good[0].call_once("GET", "/health")
            health.append(time.perf_counter() - t0)
            rss.append(rss_kib(pid))
            time.sleep(5)
        for t in threads:
            t.join(timeout=300)
        time.sleep(ttl + 5)  # every session left by a bad client expires
        metrics = dict(line.rsplit(" ", 1) for line in good[0].call_once("GET", "/metrics")[1].splitlines()
                       if line.startswith("snapkv_"))
        held = slots - float(metrics["snapkv_cache_slots_free"])
        sessions_open = float(metrics["snapkv_sessions_open"])
        rss_end = rss_kib(pid)
        statuses = {line.split('"')[1]: float(line.split()[-1]) for line in good[0].call_once(
            "GET", "/metrics")[1].splitlines() if line.startswith("snapkv_requests_total{")}
    for c in good + bad:
        client_errors.update(c.errors)
    good_times = [s for _, s in latencies]
    result = {"seconds": args.seconds, "good_clients": args.good, "bad_clients": args.bad, "note": args.note,
              "good_requests": len(latencies), "good_failures": len(failures), "failure_examples": failures[:5],
              "good_retries": sum(c.retries for c in good),
              "good_p50_s": percentile(good_times, 50), "good_p99_s": percentile(good_times, 99),
              "good_p99_by_kind": {k: percentile([s for kind, s in latencies if kind == k], 99)
                                   for k in ("whole", "stream", "session")},
              "health_p99_s": percentile(health, 99), "health_max_s": max(health),
              "attacks": dict(done), "server_statuses": statuses, "client_errors": dict(client_errors),
              "rss_start_mib": rss_start / 1024, "rss_end_mib": rss_end / 1024, "rss_max_mib": max(rss) / 1024,
              "slots_held_after": held, "sessions_open_after": sessions_open}
    write(result)
    print(json.dumps(result, indent=1))


def write(r: dict) -> None:
    (RESULTS / "serve_soak_cpu.json").write_text(json.dumps(r, indent=1) + "\n")
    lines = [
        "# snapkv-serve soak: good and bad clients together",
        "",
        f"`python -m benchmarks.serve_soak --seconds {r['seconds']:g}`: SmolLM2-135M-Instruct on the 2-core CPU, 8 "
        f"slots, 7 sessions (1 per API key), {r['good_clients']} good clients and {r['bad_clients']} bad ones at "
        f"once for {r['seconds']:g} s "
        "(benchmarks/serve_soak.py says what each does)." + (f" {r['note']}" if r.get("note") else ""),
        "",
        "| | |",
        "|---|---:|",
        f"| good requests served (a 3-turn conversation counts once) | {r['good_requests']} |",
        f"| good requests that failed (after up to 3 retries of a 429/503) | {r['good_failures']} |",
        f"| retries the good clients made (capacity: 429/503) | {r['good_retries']} |",
        f"| good latency p50 / p99 | {r['good_p50_s']:.2f} s / {r['good_p99_s']:.2f} s |",
        *(f"| good p99, {k} | {v:.2f} s |" for k, v in r["good_p99_by_kind"].items()),
        f"| /health p99 / max | {r['health_p99_s'] * 1000:.0f} ms / {r['health_max_s'] * 1000:.0f} ms |",
        f"| server RSS start / end / max | {r['rss_start_mib']:.0f} / {r['rss_end_mib']:.0f} / "
        f"{r['rss_max_mib']:.0f} MiB |",
        f"| slots held once every session expired (must be 0) | {r['slots_held_after']:g} |",
        f"| sessions open then | {r['sessions_open_after']:g} |",
        "",
        "Attacks sent: " + ", ".join(f"{k} {v}" for k, v in sorted(r["attacks"].items())) + ".",
        "",
        "Answers by status (the server's `snapkv_requests_total`; 499: the client left first): " +
        ", ".join(f"{k}: {v:g}" for k, v in sorted(r["server_statuses"].items())) + ".",
        "",
        "Refusals seen by the clients, by status and code: " +
        ", ".join(f"{k} {v}" for k, v in sorted(r["client_errors"].items())) + ".",
        "",
    ]
    (RESULTS / "serve_soak_cpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
