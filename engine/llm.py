"""LLM: the public face of the engine — load a model, then generate, stream, or drive the step loop yourself.

    llm = LLM("weights/SmolLM2-135M-Instruct", snapkv=SnapKVConfig(budget=1024))
    outs = llm.generate(["prompt", ...], SamplingParams(max_tokens=64), chat=True)
    rid = llm.add_request("prompt", SamplingParams(...)); outs = llm.step()   # the server's loop

A thin facade over the runtime, top-down: a request becomes a `Sequence`; the `Scheduler` queues it and, once a
cache slot is free, admits it; the `ModelRunner` prefills it into that slot (SnapKV selects inside every layer)
and then decodes all live slots together, one token per step, sampling on the device; the host reads the step's
tokens, detokenizes incrementally and decides who is done, freeing their slots for the next waiting request.
`generate` and `stream` are requests of that same loop, so they may run from several threads at once.
"""

from __future__ import annotations

import functools
import itertools
import operator
import secrets
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Iterator

import torch

from engine import tensor_parallel
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequest, NoCapacity, PromptTooLong
from engine.kv_cache import available_memory_bytes, format_bytes
from engine.memory_model import longest_prompt_that_fits, predict_prefill_peak
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import ProgressFn, RequestOutput, Sequence, Status
from engine.session import ChatSession
from engine.tensor_parallel import RankFailure
from engine.tokenizer import Tokenizer
from models.attention import prefill_repeats_kv
from models.loader import load_config, load_model, weight_bytes
from models.parallel import shard_config
from snapkv.config import SnapKVConfig
from snapkv.policies import SelectionPolicy, make_policy

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")
KV_DTYPES = ("auto", "int8")
DEFAULT_NEW_TOKENS = 1024  # with SnapKV, a slot holds budget + this many entries unless max_kv_len says otherwise
CACHE_MEMORY_SHARE = 0.5  # a default-sized cache takes at most this share of free memory; prefill needs the rest
ENGINE_POLICY = object()  # add_request(snapkv=...) default: the engine's own SnapKV settings


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str | torch.dtype = "auto",
                 snapkv: SnapKVConfig | None = None, max_batch_size: int = 8, max_kv_len: int | None = None,
                 max_model_len: int | None = None, allow_longer_context: bool = False, cuda_graph: bool = True,
                 compile: bool = False, prefill_chunk_size: int | None = None, weights_dtype: str = "auto",
                 kv_dtype: str = "auto", tensor_parallel_size: int = 1):
        """dtype: of the weights and the KV cache; "auto" is bfloat16 on a GPU that supports it (else float16) and
        float32 on CPU. max_batch_size: cache slots, i.e. requests decoded together. max_kv_len: entries a slot
        holds (default: the SnapKV budget + 1024 new tokens, or the model's length for the full cache; a default
        never takes more than half the free memory). allow_longer_context: accept prompts past the model's
        max_position_embeddings (RoPE extrapolates; the config's rope scaling, if any, applies). cuda_graph: on
        CUDA, decode by replaying captured graphs (False: eager). compile: run the decode step through
        torch.compile (with cuda_graph on CUDA, the compiled step is what gets captured). prefill_chunk_size:
        prompts are prefilled layer by layer in chunks of this many queries, which bounds prefill memory (default
        4096 on CUDA; 512 on CPU, where SDPA materializes each chunk's causal mask, chunk x prompt length).
        weights_dtype: how the projections, embedding and lm_head are stored: "auto" (a GGUF keeps its own
        quantization; anything else is stored in dtype), "float32", "bfloat16", "float16", "int8" (per output
        channel) or "int4" (group-wise; embedding and lm_head int8) — models.loader.load_model says the details.
        kv_dtype: "auto" (the cache in dtype) or "int8" (a float32 scale per entry and kv head, ~2x smaller than
        bfloat16 at head_dim 64-128). tensor_parallel_size: shard the model over this many ranks, one process
        (and GPU) each (engine.tensor_parallel): it must divide the model's kv heads; this process is rank 0, the
        others are started here, or by torchrun across nodes (LLM(...) then never returns on a rank > 0). Call
        close() (or use `with LLM(...) as llm:`) to stop them."""
        if not isinstance(device, (str, torch.device)) or str(device).split(":")[0] not in DEVICES:
            raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        if self.dtype is None:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        _check_positive("max_batch_size", max_batch_size)
        _check_positive("tensor_parallel_size", tensor_parallel_size)
        prefill_chunk_size = (4096 if self.device.type == "cuda" else 512) if prefill_chunk_size is None \
            else prefill_chunk_size
        _check_positive("prefill_chunk_size", prefill_chunk_size)
        if max_kv_len is not None:
            _check_positive("max_kv_len", max_kv_len)
        self.prefill_chunk_size = prefill_chunk_size
        path = Path(model)
        if not path.exists():
            raise ValueError(f"{path}: no such model file or directory")
        self.config = load_config(path)
        self.tokenizer = Tokenizer.from_path(path)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unsupported kv dtype {kv_dtype!r}; use one of {', '.join(KV_DTYPES)}")
        self.kv_int8 = kv_dtype == "int8"
        self.snapkv = snapkv
        self.policy = self.make_policy(snapkv)
        self.max_batch_size = max_batch_size
        self.allow_longer_context = allow_longer_context
        limit = self.config.max_position_embeddings
        self.max_model_len = (max_model_len or 1 << 31) if allow_longer_context else min(max_model_len or limit, limit)
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids)
        self.kv_bytes_per_entry = self.config.kv_bytes_per_token(self.dtype.itemsize, self.kv_int8)
        self.full_kv_bytes_per_entry = self.config.kv_bytes_per_token(self.dtype.itemsize)  # a full cache in dtype
        self.prefill_repeats_kv = prefill_repeats_kv(self.device, self.dtype, self.config.sliding_window)
        self.tensor_parallel_size, self.ranks = tensor_parallel_size, None
        try:
            runner = ModelRunner
            if tensor_parallel_size > 1:
                shard_config(self.config, tensor_parallel_size)  # refuses a size that does not divide the kv heads
                self.ranks = tensor_parallel.start(tensor_parallel_size, self.device)
                self._finalizer = weakref.finalize(self, self.ranks.close)
                self.device = self.ranks.device
                spec = tensor_parallel.WorkerSpec(str(path), self.dtype, weights_dtype)
                self.model = tensor_parallel.load_sharded(self.ranks, spec)
                runner = functools.partial(tensor_parallel.ParallelRunner, self.ranks)
            else:
                self.model = load_model(path, self.dtype, self.device, self.config, weights_dtype)
            self.runner = runner(self.model, max_batch_size, self._capacity(max_kv_len), prefill_chunk_size,
                                 cuda_graph=cuda_graph, compile=compile, kv_int8=self.kv_int8)
        except BaseException:  # no worker outlives a failed start
            if self.ranks is not None:
                self.ranks.close()
            raise
        self.weights_dtype = weights_dtype
        self.weight_bytes = weight_bytes(self.model) * tensor_parallel_size  # every rank's (about equal) share
        self.max_kv_len = self.runner.capacity
        self.scheduler = Scheduler(max_batch_size, prefill_chunk_size, self._admission_check)
        self._lock = threading.RLock()  # one step at a time; generate/stream from other threads join the loop
        self._ids = itertools.count()
        self._unclaimed: list[RequestOutput] = []  # outputs of add_request requests produced by others' steps
        self.last_decode_s: float | None = None  # how long the latest decode step took (for the server's metrics)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the LLM is garbage-collected or at exit)."""
        if self.ranks is not None:
            self._finalizer()

    def __enter__(self) -> "LLM":
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

    def _capacity(self, max_kv_len: int | None) -> int:
        if max_kv_len is not None:
            return max_kv_len  # KVCache refuses it, with the numbers, if it does not fit
        per_entry = self.kv_bytes_per_entry  # on GPUs each rank holds its share of the kv heads in its own memory
        per_entry //= self.tensor_parallel_size if self.device.type == "cuda" else 1
        fits = int(available_memory_bytes(self.device) * CACHE_MEMORY_SHARE) // (self.max_batch_size * per_entry)
        compressed = self.snapkv is not None and self.snapkv.policy != "full"
        wanted = self.policy.kept_length(self.max_model_len) + DEFAULT_NEW_TOKENS if compressed else self.max_model_len
        capacity = min(wanted, self.max_model_len, fits)
        if capacity < 1:
            raise ValueError(f"not even one cache entry per slot fits in free memory ({self.max_batch_size} "
                             "slots); lower max_batch_size")
        return capacity

    # --- requests ---------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"a prompt must be a string (got {type(prompt).__name__}); pass token ids as "
                                 "prompt_token_ids")
        return self.encode_messages([{"role": "user", "content": prompt}]) if chat else self.tokenizer.encode(prompt)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation rendered by the model's chat template (ending in the assistant's turn), as token ids."""
        text = self.tokenizer.apply_chat_template(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template carries its own bos

    def _check_prompt(self, ids) -> list[int]:
        """A list of in-vocabulary token ids that leaves room for at least one new token."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InvalidRequest(f"prompt token ids must be a list of integers (got {type(ids).__name__})")
        try:
            ids = [operator.index(t) for t in ids]
        except TypeError:
            raise InvalidRequest("prompt token ids must be integers; pass a list of lists of ints, e.g. "
                             "prompt_token_ids=[[1, 2, 3]]") from None
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= self.max_model_len:
            hint = "" if self.allow_longer_context else " or allow longer contexts (--allow-longer-context)"
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but the model handles at most {self.max_model_len} "
                             f"positions; shorten the prompt{hint}")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        return ids

    def room_for(self, prompt_len: int, snapkv: SnapKVConfig | None = ENGINE_POLICY) -> int:
        """The most tokens a request with a prompt of this length may ask for: what is left of the model's
        positions and of a slot once the prompt's kept entries are in (the admission check's first two limits)."""
        policy = self.policy if snapkv is ENGINE_POLICY else self.make_policy(snapkv)
        return min(self.max_model_len - prompt_len, self.runner.capacity - policy.kept_length(prompt_len))

    def _admission_check(self, seq: Sequence) -> None:
        """Refuse, before anything runs, a request that can never fit: positions, slot capacity, prefill memory.
        A conversation's turn counts its positions from the conversation's start and chooses among the entries
        its slot holds plus its own tokens."""
        n, m, what = seq.start_position + len(seq.prompt_token_ids), seq.params.max_tokens, "prompt"
        if seq.session is not None:
            what = "conversation"
        elif self.scheduler.reserved >= self.max_batch_size:
            raise NoCapacity(f"all {self.max_batch_size} cache slots are held by chat sessions, so this request "
                             "would never run; close a session or build the engine with a larger max_batch_size")
        kept, capacity, candidates = seq.kept_length, self.runner.capacity, seq.candidates
        if n + m > self.max_model_len:
            raise PromptTooLong(f"the {what} has {n} tokens and max_tokens is {m}, together past the model's "
                             f"{self.max_model_len} positions; lower max_tokens (-n) to at most "
                             f"{self.max_model_len - n} or shorten the {what}")
        if kept + m > capacity:
            source = f"{candidates} held and new entries" if seq.session else f"{candidates}-token prompt"
            fix = (f"lower max_tokens (-n) to at most {capacity - kept}, lower the SnapKV budget" if kept < capacity
                   else f"its kept entries alone fill the slot: lower the SnapKV budget, shorten the {what}")
            raise PromptTooLong(f"the request needs {kept + m} cache entries ({source}, {kept} kept, "
                             f"max_tokens {m}) but a slot holds {capacity}; {fix}, or build the engine with "
                             f"max_kv_len >= {kept + m}")
        window = seq.policy.queries_needed
        e, chunk, kind = self.dtype.itemsize, self.prefill_chunk_size, self.device.type
        estimate = predict_prefill_peak(self.config, candidates, e, chunk, window, kind, self.prefill_repeats_kv)
        free = available_memory_bytes(self.device)
        if estimate.total > free:
            fits = longest_prompt_that_fits(self.config, free, e, chunk, window, kind,
                                            repeat_kv=self.prefill_repeats_kv)
            raise PromptTooLong(
                f"a {n}-token prompt needs about {format_bytes(estimate.total)} beyond the weights and the cache "
                f"to prefill ({estimate.describe()}) but {format_bytes(free)} is free on {self.device}; about "
                f"{fits} tokens would fit: shorten the prompt or lower the prefill chunk size")
        seq.stats["predicted_peak_bytes"] = estimate.total

    def add_request(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                    chat: bool = False, prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                    snapkv: SnapKVConfig | None = ENGINE_POLICY, return_kept: bool = False,
                    progress: ProgressFn | None = None) -> str:
        """Queue one request (text, or pre-tokenized `prompt_token_ids`) and return its id; `step()` runs it.
        snapkv: this request's own selection settings (None: full cache); by default the engine's. Raises
        ValueError, naming the numbers and what to change, for a request that can never fit."""
        return self._add(prompt, sampling_params, chat, prompt_token_ids, request_id, snapkv, return_kept,
                         progress, mailbox=None).request_id

    def _add(self, prompt, params, chat, prompt_token_ids, request_id, snapkv, return_kept, progress,
             mailbox, turn: tuple[ChatSession, SelectionPolicy] | None = None) -> Sequence:
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of a prompt or prompt_token_ids")
        ids = self._check_prompt(self.encode_prompt(prompt, chat) if prompt_token_ids is None else prompt_token_ids)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling params must be a SamplingParams (got {type(params).__name__})")
        if params.top_k > self.config.vocab_size:
            raise InvalidRequest(f"top_k ({params.top_k}) is larger than the vocabulary ({self.config.vocab_size}); "
                                 "use 0 to disable it", "top_k")
        policy = turn[1] if turn else self.policy if snapkv is ENGINE_POLICY else self.make_policy(snapkv)
        with self._lock:
            rid = str(next(self._ids)) if request_id is None else str(request_id)
            if self.scheduler.find(rid) is not None:
                raise InvalidRequest(f"request id {rid!r} is already in use")
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            seq = Sequence(rid, ids, params, seed, policy, IncrementalDetokenizer(self.tokenizer, params.stop),
                           self.eos_ids, return_kept, progress, mailbox)
            if turn:
                session = seq.session = turn[0]
                seq.pinned_slot, seq.start_position = session.slot, session.conversation_tokens
                seq.past_positions, seq.past_kv = session.past_candidates()
            self.scheduler.add(seq)
        return seq

    def chat_session(self, system: str | None = None, snapkv: SnapKVConfig | None = ENGINE_POLICY,
                     reserve: int | None = None, full_history: bool = False) -> ChatSession:
        """A conversation that keeps its compressed cache in one slot between turns (engine.session): `send`,
        `stream`, `history`, `reset`, `close`. snapkv: its selection settings (None: the full cache; default the
        engine's). reserve: how many entries past the budget the slot may grow before it is compressed again
        (default: half the room the slot has beyond the budget). full_history: also keep every entry of the
        conversation in host memory, so that each turn selects from all of it, not only from what the slot
        kept. Raises ValueError if no slot is free."""
        cfg = self.snapkv if snapkv is ENGINE_POLICY else snapkv
        if full_history and self.ranks is not None:
            raise InvalidRequest("full_history sessions are not supported with tensor parallelism (each rank holds "
                             "its own kv heads); use full_history=False or tensor_parallel_size=1")
        with self._lock:
            slot = self.scheduler.reserve_slot()
            if slot is None:
                raise NoCapacity(f"no free cache slot for a conversation: all {self.max_batch_size} are in use by "
                                 "running requests or other conversations; close one, or build the engine with a "
                                 "larger max_batch_size")
        try:
            return ChatSession(self, slot, system, cfg, reserve, full_history)
        except BaseException:  # whatever failed, the reserved slot goes back
            with self._lock:
                self.scheduler.unreserve_slot(slot)
            raise

    def _release_session_slot(self, slot: int) -> None:
        with self._lock:
            self.runner.release(slot)
            self.scheduler.unreserve_slot(slot)

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or bool(self._unclaimed)

    def load(self) -> dict:
        """What the engine holds now: running and waiting requests, free slots and those chat sessions hold, and
        the KV bytes of the running requests, kept and as a full cache would hold them (for the server's
        metrics)."""
        with self._lock:
            running = list(self.scheduler.running.values())
            per_entry, full_per_entry = self.kv_bytes_per_entry, self.full_kv_bytes_per_entry
            return {"running": len(running), "waiting": len(self.scheduler.waiting),
                    "free_slots": len(self.scheduler.free_slots), "session_slots": self.scheduler.reserved,
                    "kv_bytes": per_entry * sum(s.stats.get("kept_tokens", 0) + len(s.token_ids) for s in running),
                    "full_kv_bytes": full_per_entry * sum(len(s.prompt_token_ids) + len(s.token_ids) for s in running)}

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; its slot is free for the next one at once. False if unknown."""
        with self._lock:
            seq = self.scheduler.find(str(request_id))
            if seq is None:
                return False
            if seq.status is Status.WAITING:
                self.scheduler.remove_waiting(seq)
                seq.finish("abort")
                if seq.session is not None:
                    seq.session.turn_ended(seq, prefilled=False)
            else:
                seq.finish("abort")
                self._retire(seq)
            return True

    # --- the step loop ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step: admit and prefill waiting requests into free slots, then decode one token for every
        live slot. Returns an output for each add_request request that moved (its new text, and finish_reason
        once done); requests of generate()/stream() are delivered to their callers instead."""
        with self._lock:
            outputs, self._unclaimed = self._unclaimed, []
            self._step()
            outputs += self._unclaimed
            self._unclaimed = []
            return outputs

    def _step(self) -> None:
        moved: dict[str, Sequence] = {}
        self.last_decode_s = None
        for seq in self.scheduler.admit():
            seq.stats["queue_s"] = _since(seq.arrival)
            moved[seq.request_id] = seq
            try:
                seq.append(self.runner.prefill(seq))
            except RankFailure:  # the ranks are out of step: nothing more can run
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
            except RankFailure:
                raise
            except Exception as e:  # the step is shared: its requests fail, the engine serves the next ones
                tokens = None
                self._fail(live, "decode step", e)
            self.last_decode_s = _since(start)
            for seq in live:
                if tokens is not None:
                    seq.append(tokens[seq.slot])
                moved[seq.request_id] = seq
                if seq.finish_reason:
                    self._retire(seq)
        for seq in moved.values():
            out = seq.output()
            (seq.mailbox if seq.mailbox is not None else self._unclaimed).append(out)

    def _fail(self, seqs: list[Sequence], stage: str, error: Exception) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for seq in seqs:
            seq.error = f"{stage} failed: {type(error).__name__}: {error}"
            seq.finish("error")

    def _retire(self, seq: Sequence) -> None:
        """Free the slot of a finished (or aborted) request and record what its cache cost."""
        if seq.slot is not None:
            self.runner.release(seq.slot)
            self.scheduler.release(seq)
        per_entry, generated = self.kv_bytes_per_entry, len(seq.token_ids)
        seq.stats.update(weight_bytes=self.weight_bytes, kv_dtype="int8" if self.kv_int8 else str(self.dtype)[6:],
                         kv_bytes=per_entry * (seq.stats.get("kept_tokens", 0) + generated),
                         full_kv_bytes=self.full_kv_bytes_per_entry * (seq.start_position + len(seq.prompt_token_ids) + generated),
                         ttft_s=seq.first_token_at - seq.arrival if seq.first_token_at else None)
        if seq.session is not None:
            seq.session.turn_ended(seq, prefilled=True)

    def _run_until(self, done) -> None:
        while not done():
            with self._lock:
                if not done():
                    self._step()

    # --- offline and streaming use ----------------------------------------------------------------------------

    def generate(self, prompts: str | list[str] | None = None, sampling_params: SamplingParams | list | None = None,
                 chat: bool = False, prompt_token_ids: list[list[int]] | None = None, return_kept: bool = False,
                 progress: ProgressFn | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or pre-tokenized `prompt_token_ids`, a list of lists), all requests
        of the continuous-batching loop. Results come back in order and never depend on the batch. Invalid input
        raises; a request that cannot fit a slot gets finish_reason "error" and its reason in `error`, and the
        others run normally."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is not None and (not isinstance(prompt_token_ids, (list, tuple)) or any(
                isinstance(p, int) for p in prompt_token_ids)):
            raise ValueError("prompt_token_ids must be a list of token-id lists, one per prompt, e.g. [[1, 2, 3]]")
        ids_list = [self._check_prompt(ids) for ids in prompt_token_ids] if prompts is None else \
            [self._check_prompt(self.encode_prompt(p, chat)) for p in prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids_list)
        if len(params) != len(ids_list):
            raise ValueError(f"got {len(params)} sampling params for {len(ids_list)} prompts")
        results: list[RequestOutput | None] = [None] * len(ids_list)
        pending: dict[int, Sequence] = {}
        for i, (ids, p) in enumerate(zip(ids_list, params)):
            try:
                # a one-output mailbox: generate only needs the final output
                pending[i] = self._add(None, p, False, ids, None, ENGINE_POLICY, return_kept, progress,
                                       deque(maxlen=1))
            except ValueError as refused:
                results[i] = RequestOutput("", ids, finish_reason="error", error=str(refused))
        self._run_until(lambda: all(s.status is Status.FINISHED for s in pending.values()))
        for i, seq in pending.items():
            results[i] = seq.mailbox[-1]
        return results

    def stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None, chat: bool = False,
               prompt_token_ids: list[int] | None = None, progress: ProgressFn | None = None,
               result: list | None = None) -> Iterator[str]:
        """Yield the text of one request as it is produced. If `result` is a list, the final RequestOutput is
        appended to it (for stats) once the stream ends. Closing the iterator early aborts the request."""
        seq = self._add(prompt, sampling_params, chat, prompt_token_ids, None, ENGINE_POLICY, False, progress,
                        deque())
        return self._drain(seq, result)

    def _drain(self, seq: Sequence, result: list | None) -> Iterator[str]:
        """Step the engine until seq finishes, yielding its new text; closing early aborts it."""
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
                with self._lock:
                    if not seq.mailbox:
                        self._step()
        finally:
            if seq.status is not Status.FINISHED:
                self.abort(seq.request_id)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype | None:
    """The torch dtype for a name or dtype ("auto": bfloat16 on CUDA where supported, else float16; float32 on
    CPU); None if it is not one the engine runs."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in DTYPES.values() else None


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer (got {value!r})")


def _since(t: float) -> float:
    return time.perf_counter() - t
