"""LLM: the public face of the engine — load a model, then generate, stream, or drive the step loop yourself
(`add_request` + `step`, as the server does). A thin facade, top-down: a request becomes a `Sequence`, the
`Scheduler` admits it into a free cache slot, the `ModelRunner` prefills it there (SnapKV selects inside every
layer) and decodes all live slots together, one token per step; the host detokenizes and retires who is done.
`generate` and `stream` are requests of that same loop, so they may run from several threads at once. Loading,
quantization, tensor parallelism and chat sessions come from wings (`engine.wings`).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from engine import wings
from engine.admission import check_fits, check_prompt, slot_capacity
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import EngineFailure, InvalidRequest, NoCapacity
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Placement, ProgressFn, RequestOutput, Sequence, Status
from engine.tokenizer import Tokenizer
from models.attention import prefill_repeats_kv
from models.llama import weight_bytes
from snapkv.config import SnapKVConfig
from snapkv.policies import SelectionPolicy, make_policy

ENGINE_DEFAULT = object()  # a sentinel: add_request(snapkv=ENGINE_DEFAULT) takes the engine's own SnapKV settings


class LLM:
    def __init__(self, model: str | Path, config: EngineConfig | None = None, **options):
        """model: an HF-style directory or a .gguf file; options: EngineConfig's. close() (or `with`) stops
        tensor-parallel workers."""
        self.options = opts = config if config is not None else EngineConfig(**options)
        path = Path(model)
        if not path.exists():
            raise ValueError(f"{path}: no such model file or directory")
        checkpoints = wings.need("checkpoints", "loading a model")
        self.device, self.dtype, self.prefill_chunk_size = opts.torch_device, opts.torch_dtype, opts.prefill_chunk_size
        self.config = checkpoints.load_config(path)
        self.tokenizer = Tokenizer.from_path(path)
        self.snapkv, self.policy = opts.snapkv, self.make_policy(opts.snapkv)
        self.max_batch_size, self.allow_longer_context = opts.max_batch_size, opts.allow_longer_context
        limit, wanted = self.config.max_position_embeddings, opts.max_model_len
        self.max_model_len = (wanted or 1 << 31) if opts.allow_longer_context else min(wanted or limit, limit)
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids)
        cache_class = wings.need("kv_int8", "kv_dtype int8") if opts.kv_dtype == "int8" else None
        self.kv_dtype = "int8" if opts.kv_dtype == "int8" else str(self.dtype).removeprefix("torch.")
        self.kv_bytes_per_entry = self.config.kv_bytes_per_token(  # int8: values and their scales
            self.dtype.itemsize, cache_class and cache_class.entry_bytes(self.config.head_dim, self.dtype))
        self.full_kv_bytes_per_entry = self.config.kv_bytes_per_token(self.dtype.itemsize)  # a full cache in dtype
        self.prefill_repeats_kv = prefill_repeats_kv(self.device, self.dtype, self.config.sliding_window)
        self.ranks = None  # tensor parallelism: the group's handle (parallel.runner), failed / close()
        if opts.tensor_parallel_size > 1:
            start = wings.need("tensor_parallel", "tensor_parallel_size > 1")
            self.ranks, self.model, self.runner = start(self, path, cache_class)
            self._finalizer = weakref.finalize(self, self.ranks.close)
        else:
            self.model = checkpoints.load_model(path, self.dtype, self.device, self.config, opts.weights_dtype)
            self.runner = ModelRunner(self.model, self.max_batch_size, slot_capacity(self), self.prefill_chunk_size,
                                      opts.cuda_graph, opts.compile, cache_class)
        self.weight_bytes = weight_bytes(self.model) * opts.tensor_parallel_size  # every rank's (about equal) share
        self.max_kv_len = self.runner.capacity
        self.scheduler = Scheduler(self.max_batch_size, self.prefill_chunk_size, lambda seq: check_fits(self, seq))
        self.lock = threading.RLock()  # one step at a time; generate/stream from other threads join the loop
        self._ids = itertools.count()
        self._unclaimed: list[RequestOutput] = []  # outputs of add_request requests produced by others' steps
        self.last_decode_s: float | None = None  # how long the latest decode step took (for the server's metrics)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the LLM is garbage-collected)."""
        if self.ranks is not None:
            self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def failed(self) -> str | None:
        """Why the engine stopped (a tensor-parallel rank failed), or None while it works."""
        return self.ranks.failed if self.ranks is not None else None

    def make_policy(self, snapkv: SnapKVConfig | None) -> SelectionPolicy:
        """The selection policy for these settings on this model (its layers and sliding window)."""
        return make_policy(snapkv, self.config.num_layers, self.config.sliding_window)

    # --- requests ---------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"a prompt must be a string (got {type(prompt).__name__}); pass token ids as "
                                 "prompt_token_ids")
        return self.encode_messages([{"role": "user", "content": prompt}]) if chat else self.tokenizer.encode(prompt)

    def _one_prompt(self, prompt: str | None, chat: bool, prompt_token_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidRequest("pass exactly one of a prompt or prompt_token_ids")
        return self.encode_prompt(prompt, chat) if prompt_token_ids is None else prompt_token_ids

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation rendered by the model's chat template (ending in the assistant's turn), as token ids."""
        text = self.tokenizer.apply_chat_template(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template carries its own bos

    def room_for(self, prompt_len: int, snapkv: SnapKVConfig | None = ENGINE_DEFAULT) -> int:
        """The most tokens a prompt of this length may ask for (what positions and its slot have left)."""
        policy = self.policy if snapkv is ENGINE_DEFAULT else self.make_policy(snapkv)
        return min(self.max_model_len - prompt_len, self.runner.capacity - policy.kept_length(prompt_len))

    def add_request(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                    chat: bool = False, prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                    snapkv: SnapKVConfig | None = ENGINE_DEFAULT, return_kept: bool = False,
                    progress: ProgressFn | None = None) -> str:
        """Queue one request (text, or pre-tokenized `prompt_token_ids`) and return its id; `step()` runs it.
        snapkv: its own selection settings (None: full cache). A request that can never fit raises ValueError."""
        ids = self._one_prompt(prompt, chat, prompt_token_ids)
        policy = self.policy if snapkv is ENGINE_DEFAULT else self.make_policy(snapkv)
        return self.submit(ids, sampling_params, policy=policy, request_id=request_id, return_kept=return_kept,
                           progress=progress).request_id

    def submit(self, prompt_token_ids: list[int], params: SamplingParams | None = None, *,
               policy: SelectionPolicy | None = None, request_id: str | None = None, return_kept: bool = False,
               progress: ProgressFn | None = None, mailbox: deque | None = None, placement: Placement | None = None,
               on_finish: Callable[[Sequence], None] | None = None) -> Sequence:
        """add_request's general form: the policy to select with, outputs to a mailbox instead of step(), a
        placement (a reserved slot, continued positions and prefill), on_finish(seq) when it ends or is aborted."""
        ids = check_prompt(self, prompt_token_ids)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling params must be a SamplingParams (got {type(params).__name__})")
        if params.top_k > self.config.vocab_size:
            raise InvalidRequest(f"top_k ({params.top_k}) is larger than the vocabulary ({self.config.vocab_size}); "
                                 "use 0 to disable it", "top_k")
        with self.lock:
            rid = str(next(self._ids)) if request_id is None else str(request_id)
            if self.scheduler.find(rid) is not None:
                raise InvalidRequest(f"request id {rid!r} is already in use")
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            seq = Sequence(rid, ids, params, seed, policy or self.policy,
                           IncrementalDetokenizer(self.tokenizer, params.stop), self.eos_ids, return_kept, progress,
                           mailbox, placement, on_finish)
            self.scheduler.add(seq)
        return seq

    def chat_session(self, system: str | None = None, snapkv: SnapKVConfig | None = ENGINE_DEFAULT,
                     reserve: int | None = None, full_history: bool = False):
        """A conversation that keeps its compressed cache in a slot between turns (sessions.ChatSession)."""
        session = wings.need("sessions", "chat sessions")
        return session(self, system, self.snapkv if snapkv is ENGINE_DEFAULT else snapkv, reserve, full_history)

    def reserve_slot(self) -> int:
        """Take a cache slot out of the pool (for requests placed in it) until release_slot; NoCapacity if none."""
        with self.lock:
            slot = self.scheduler.reserve_slot()
        if slot is None:
            raise NoCapacity(f"no free cache slot for a conversation: all {self.max_batch_size} are in use by "
                             "running requests or other conversations; close one, or build the engine with a "
                             "larger max_batch_size")
        return slot

    def release_slot(self, slot: int) -> None:
        with self.lock:
            self.runner.release(slot)
            self.scheduler.unreserve_slot(slot)

    def has_unfinished(self) -> bool:
        with self.lock:
            return self.scheduler.has_unfinished() or bool(self._unclaimed)

    def load(self) -> dict:
        """Requests running and waiting, slots free and held by sessions, KV bytes held (and as a full cache)."""
        with self.lock:
            held = [self.kv_bytes(s) for s in self.scheduler.running.values()]
            return {"running": len(held), "waiting": len(self.scheduler.waiting),
                    "free_slots": len(self.scheduler.free_slots), "session_slots": self.scheduler.reserved,
                    "kv_bytes": sum(k for k, _ in held), "full_kv_bytes": sum(f for _, f in held)}

    def kv_bytes(self, seq: Sequence) -> tuple[int, int]:
        """The bytes seq's cache entries take, and would take as a full cache in the engine's dtype."""
        n = len(seq.token_ids)
        return (self.kv_bytes_per_entry * (seq.stats.get("kept_tokens", 0) + n),
                self.full_kv_bytes_per_entry * (seq.placement.start + len(seq.prompt_token_ids) + n))

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; its slot is free for the next one at once. False if unknown."""
        with self.lock:
            seq = self.scheduler.find(str(request_id))
            if seq is None:
                return False
            if seq.status is Status.WAITING:
                self.scheduler.remove_waiting(seq)
            seq.finish("abort")
            self._retire(seq)
            return True

    # --- the step loop ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Admit and prefill waiting requests, then decode one token for every live slot. Returns an output for
        each add_request request that moved (generate/stream requests go to their callers instead)."""
        with self.lock:
            outputs, self._unclaimed = self._unclaimed, []
            self._step()
            outputs += self._unclaimed
            self._unclaimed = []
            return outputs

    def _step(self) -> None:
        moved: dict[str, Sequence] = {}
        self.last_decode_s = None
        for seq in self.scheduler.admit():
            seq.record(queue_s=time.perf_counter() - seq.arrival)
            moved[seq.request_id] = seq
            try:
                seq.append(self.runner.prefill(seq))
            except EngineFailure:  # the engine itself stopped (a tensor-parallel rank): nothing more can run
                raise
            except Exception as e:  # one request's failure (out of memory, say) must not stop the others
                self._fail([seq], "prefill", e)
            if seq.finish_reason:
                self._retire(seq)
        live = list(self.scheduler.running.values())
        if live:
            start = time.perf_counter()
            try:
                tokens = self.runner.decode(live)
            except EngineFailure:
                raise
            except Exception as e:  # the step is shared: its requests fail, the engine serves the next ones
                tokens = None
                self._fail(live, "decode step", e)
            self.last_decode_s = time.perf_counter() - start
            for seq in live:
                if tokens is not None:
                    seq.append(tokens[seq.slot])
                moved[seq.request_id] = seq
                if seq.finish_reason:
                    self._retire(seq)
        for seq in moved.values():
            (seq.mailbox if seq.mailbox is not None else self._unclaimed).append(seq.output())

    def _fail(self, seqs: list[Sequence], stage: str, error: Exception) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        for seq in seqs:
            seq.finish("error", f"{stage} failed: {type(error).__name__}: {error}")

    def _retire(self, seq: Sequence) -> None:
        """Free a finished or aborted request's slot, record what its cache cost, tell its owner."""
        if seq.slot is not None:
            self.runner.release(seq.slot)
            self.scheduler.release(seq)
        kv_bytes, full_kv_bytes = self.kv_bytes(seq)
        seq.record(weight_bytes=self.weight_bytes, kv_dtype=self.kv_dtype, kv_bytes=kv_bytes,
                   full_kv_bytes=full_kv_bytes)
        if seq.on_finish is not None:
            seq.on_finish(seq)

    def run_until(self, done: Callable[[], bool]) -> None:
        """Step the engine until done() (other threads' steps count too)."""
        while not done():
            with self.lock:
                if not done():
                    self._step()

    # --- offline and streaming use ----------------------------------------------------------------------------

    def generate(self, prompts: str | list[str] | None = None, sampling_params: SamplingParams | list | None = None,
                 chat: bool = False, prompt_token_ids: list[list[int]] | None = None, return_kept: bool = False,
                 progress: ProgressFn | None = None) -> list[RequestOutput]:
        """Every prompt (or `prompt_token_ids`, a list of lists) as requests of the loop, results in order. Invalid
        input raises; a request that cannot fit gets finish_reason "error" (why: `error`), the others run."""
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidRequest("pass exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is not None and (not isinstance(prompt_token_ids, (list, tuple)) or any(
                isinstance(p, int) for p in prompt_token_ids)):
            raise InvalidRequest("prompt_token_ids must be a list of token-id lists, one per prompt, e.g. "
                                 "[[1, 2, 3]]")
        ids_list = [check_prompt(self, ids) for ids in prompt_token_ids] if prompts is None else \
            [check_prompt(self, self.encode_prompt(p, chat)) for p in prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids_list)
        if len(params) != len(ids_list):
            raise InvalidRequest(f"got {len(params)} sampling params for {len(ids_list)} prompts")
        results: list[RequestOutput | None] = [None] * len(ids_list)
        pending: dict[int, Sequence] = {}
        for i, (ids, p) in enumerate(zip(ids_list, params)):
            try:  # a one-output mailbox: generate only needs the final output
                pending[i] = self.submit(ids, p, return_kept=return_kept, progress=progress, mailbox=deque(maxlen=1))
            except ValueError as refused:
                results[i] = RequestOutput("", ids, finish_reason="error", error=str(refused))
        self.run_until(lambda: all(s.status is Status.FINISHED for s in pending.values()))
        for i, seq in pending.items():
            results[i] = seq.mailbox[-1]
        return results

    def stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None, chat: bool = False,
               prompt_token_ids: list[int] | None = None, progress: ProgressFn | None = None,
               result: list | None = None) -> Iterator[str]:
        """Yield one request's text as it comes; its final RequestOutput is appended to `result` (if a list).
        Closing the iterator early aborts the request."""
        ids = self._one_prompt(prompt, chat, prompt_token_ids)
        return self.follow(self.submit(ids, sampling_params, progress=progress, mailbox=deque()), result)

    def follow(self, seq: Sequence, result: list | None = None) -> Iterator[str]:
        """Step the engine until seq (submitted with a mailbox) finishes, yielding its new text."""
        try:
            while True:
                while seq.mailbox:
                    out = seq.mailbox.popleft()
                    if out.new_text:
                        yield out.new_text
                    if out.finished:
                        if result is not None:
                            result.append(out)
                        return
                with self.lock:
                    if not seq.mailbox:
                        self._step()
        finally:
            if seq.status is not Status.FINISHED:
                self.abort(seq.request_id)
