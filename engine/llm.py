"""LLM: the public face of the engine — load a model, then generate (batched) or stream text.

    llm = LLM("weights/SmolLM2-135M-Instruct", snapkv=SnapKVConfig(budget=1024))
    outs = llm.generate(["prompt", ...], SamplingParams(max_tokens=64), chat=True)

The loop, top-down: each prompt is prefilled alone (full-length attention; inside every layer the selection
policy compresses that layer's K/V straight into the static cache), then all sequences of a batch decode together,
one token per step, from fixed batch slots; finished slots are masked, not removed, so shapes never change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.cache_views import PrefillView
from engine.decode_step import CompiledStep, CUDAGraphStep, DecodeStep, batch_bucket
from engine.kv_cache import KVCache, available_memory_bytes, format_bytes
from engine.memory_model import PeakMeter, longest_prompt_that_fits, predict_generation_peak
from engine.sampler import make_generator, sample_tokens
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from models.loader import load_config, load_model
from snapkv.config import SnapKVConfig
from snapkv.policies import make_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAPACITY_MULTIPLE = 64  # cache capacities are rounded up so that calls of similar size reuse one graph/compile

# progress(stage, done, total): stage is "prefill" (done = layers of the current prompt) or "decode" (tokens)
ProgressFn = Callable[[str, int, int], None]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"
    stats: dict = field(default_factory=dict)
    kept: list[torch.Tensor] | None = None  # with return_kept: per layer, [kv_heads, n] kept prompt positions


class _Sequence:
    """Book-keeping of one request while it generates."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = make_generator(params.seed, device) if not params.greedy else None
        self.out = RequestOutput(prompt_token_ids=prompt_ids)
        self.emitted = 0  # characters of text already streamed

    def add_token(self, token: int, tokenizer: Tokenizer, eos_ids: set[int], max_tokens: int) -> None:
        out = self.out
        out.token_ids.append(token)
        out.text = tokenizer.decode(out.token_ids)
        if token in eos_ids and not self.params.ignore_eos:
            out.finish_reason = "stop"
        for s in self.params.stop:
            cut = out.text.find(s, max(0, self.emitted - len(s)))
            if cut != -1:
                out.text, out.finish_reason = out.text[:cut], "stop"
        if out.finish_reason is None and len(out.token_ids) >= max_tokens:
            out.finish_reason = "length"

    def new_text(self) -> str:
        """Text that is safe to show now: not a half-decoded UTF-8 character, not a possible stop-string start."""
        text = self.out.text
        end = len(text)
        if self.out.finish_reason is None:
            if text.endswith("\ufffd"):
                return ""
            for s in self.params.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        end = min(end, len(text) - n)
                        break
        delta = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 snapkv: SnapKVConfig | None = None, max_batch_size: int = 8, max_model_len: int | None = None,
                 allow_longer_context: bool = False, cuda_graph: bool = True, compile: bool = False,
                 prefill_chunk_size: int | None = None):
        """allow_longer_context: accept prompts past the model's max_position_embeddings (RoPE extrapolates; the
        config's rope scaling, if any, applies). cuda_graph: on CUDA, decode by replaying a captured graph (False:
        eager). compile: run the decode step through torch.compile. prefill_chunk_size: prompts longer than this
        are prefilled layer by layer in chunks of this many queries, which bounds prefill memory (default 4096 on
        CUDA; 512 on CPU, where SDPA materializes each chunk's causal mask, chunk x prompt length)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
        self.dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if self.dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer (got {max_batch_size!r})")
        prefill_chunk_size = prefill_chunk_size or (4096 if self.device.type == "cuda" else 512)
        if not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be a positive integer (got {prefill_chunk_size!r})")
        self.prefill_chunk_size = prefill_chunk_size
        path = Path(model)
        if not path.exists():
            raise ValueError(f"{path}: no such model file or directory")
        self.config = load_config(path)
        self.tokenizer = Tokenizer.from_path(path)
        self.model = load_model(path, self.dtype, self.device, self.config)
        self.snapkv = snapkv
        self.policy = make_policy(snapkv)
        self.max_batch_size = max_batch_size
        self.allow_longer_context = allow_longer_context
        limit = self.config.max_position_embeddings
        self.max_model_len = (max_model_len or 1 << 31) if allow_longer_context else min(max_model_len or limit, limit)
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids)
        self.cuda_graph, self.compile = cuda_graph, compile
        self._decoder: tuple | None = None  # (batch, capacity) -> (step, runner), kept for reuse across calls

    # --- input ------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_special_tokens=False)  # the template carries its own bos
        return self.tokenizer.encode(prompt)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            hint = "" if self.allow_longer_context else " or allow longer contexts (--allow-longer-context)"
            raise ValueError(f"the prompt has {len(ids)} tokens but the model handles at most {self.max_model_len} "
                             f"positions; shorten the prompt{hint}")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")

    # --- generation -------------------------------------------------------------------------------------------

    def generate(self, prompts: str | list[str] | None = None, sampling_params: SamplingParams | list | None = None,
                 chat: bool = False, prompt_token_ids: list[list[int]] | None = None, return_kept: bool = False,
                 progress: ProgressFn | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or pre-tokenized `prompt_token_ids`); batches of `max_batch_size`
        decode together. Greedy results do not depend on the batch a prompt lands in."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        ids_list = prompt_token_ids if prompts is None else [self.encode_prompt(p, chat) for p in prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids_list)
        if len(params) != len(ids_list):
            raise ValueError(f"got {len(params)} sampling params for {len(ids_list)} prompts")
        params = [p or SamplingParams() for p in params]
        for ids in ids_list:
            self._check_prompt(ids)
        outputs: list[RequestOutput] = []
        for start in range(0, len(ids_list), self.max_batch_size):
            group = [_Sequence(list(ids), p, self.device) for ids, p in
                     zip(ids_list[start:start + self.max_batch_size], params[start:start + self.max_batch_size])]
            for _ in self._run(group, return_kept, progress):
                pass
            outputs += [s.out for s in group]
        return outputs

    def stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None, chat: bool = False,
               prompt_token_ids: list[int] | None = None, progress: ProgressFn | None = None,
               result: list | None = None) -> Iterator[str]:
        """Yield the text of one request as it is produced. If `result` is a list, the final RequestOutput is
        appended to it (for stats) once the stream ends."""
        ids = self.encode_prompt(prompt, chat) if prompt_token_ids is None else list(prompt_token_ids)
        self._check_prompt(ids)
        seq = _Sequence(ids, sampling_params or SamplingParams(), self.device)
        for _ in self._run([seq], False, progress):
            delta = seq.new_text()
            if delta:
                yield delta
        tail = seq.new_text()
        if tail:
            yield tail
        if result is not None:
            result.append(seq.out)

    def _decode_runner(self, batch: int, capacity: int) -> tuple[DecodeStep, object]:
        """The static cache + decode step for this batch bucket and capacity, reused when the shape repeats
        (a captured CUDA graph or a compiled step is only worth its set-up cost if it is replayed)."""
        if self._decoder is not None and self._decoder[0] == (batch, capacity):
            _, step, runner = self._decoder
            runner.reset()
            return step, runner
        self._decoder = None  # free the previous cache before allocating the next
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # so that mem_get_info, which the cache size check reads, sees it as free
        cfg = self.config
        cache = KVCache(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, self.dtype, self.device,
                        track_positions=cfg.sliding_window is not None)
        step = DecodeStep(self.model, cache)
        if self.device.type == "cuda" and self.cuda_graph:
            runner = CUDAGraphStep(step)
        elif self.compile:
            runner = CompiledStep(step)
        else:
            runner = step
        self._decoder = ((batch, capacity), step, runner)
        return step, runner

    @torch.inference_mode()
    def _run(self, seqs: list[_Sequence], return_kept: bool, progress: ProgressFn | None) -> Iterator[None]:
        """Prefill every sequence into its slot, then decode them together; yields after each new token round."""
        max_new = [min(s.params.max_tokens, self.max_model_len - len(s.out.prompt_token_ids)) for s in seqs]
        kept_lengths = [self.policy.kept_length(len(s.out.prompt_token_ids)) for s in seqs]
        needed = max(k + n for k, n in zip(kept_lengths, max_new))
        capacity = -(-needed // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        batch = batch_bucket(len(seqs), self.max_batch_size)
        longest = max(len(s.out.prompt_token_ids) for s in seqs)
        predicted = self._check_memory(longest, capacity, batch, max(max_new))
        if progress is not None:
            self._attach_layer_progress(progress)
        try:
            with PeakMeter(self.device) as meter:
                step, runner = self._decode_runner(batch, capacity)
                for slot, seq in enumerate(seqs):
                    self._prefill(seq, slot, step, return_kept, max_new[slot])
                    if slot < len(seqs) - 1:
                        yield
        finally:
            self._detach_layer_progress()
        for seq in seqs:
            seq.out.stats.update(predicted_peak_bytes=predicted, measured_peak_bytes=meter.peak)
        yield

        decode_start = time.perf_counter()
        params = [None if s.out.finish_reason else s.params for s in seqs] + [None] * (batch - len(seqs))
        generators = [s.generator for s in seqs] + [None] * (batch - len(seqs))
        while any(p is not None for p in params):
            logits = runner()
            tokens = sample_tokens(logits, params, generators)
            for slot, seq in enumerate(seqs):
                if params[slot] is None:
                    continue
                seq.add_token(tokens[slot], self.tokenizer, self.eos_ids, max_new[slot])
                step.tokens[slot] = tokens[slot]
                if seq.out.finish_reason:
                    params[slot] = None
                    step.active[slot] = 0
            if progress is not None:
                progress("decode", max(len(s.out.token_ids) for s in seqs), max(max_new))
            yield
        decode_s = time.perf_counter() - decode_start
        for seq in seqs:
            generated, stats = len(seq.out.token_ids), seq.out.stats
            stats.update(decode_s=decode_s, generated_tokens=generated,
                         kv_bytes=step.cache.bytes_per_entry() * (stats["kept_tokens"] + generated),
                         full_kv_bytes=step.cache.bytes_per_entry() * (stats["prompt_tokens"] + generated))

    def _check_memory(self, prompt_len: int, capacity: int, batch: int, max_new: int) -> int:
        """Refuse, before allocating anything, a generation whose predicted peak exceeds free memory."""
        cfg, e = self.config, self.model.lm_head.weight.element_size()
        window = self.policy.queries_needed
        chunk, kind = self.prefill_chunk_size, self.device.type
        estimate = predict_generation_peak(cfg, prompt_len, capacity, batch, e, chunk, window, kind)
        held = self._decoder[1].cache.nbytes if self._decoder else 0  # freed or reused by this call
        free = available_memory_bytes(self.device) + held
        if estimate.total > free:
            def capacity_for(t):
                return self.policy.kept_length(t) + max_new

            fits = longest_prompt_that_fits(cfg, free, capacity_for, batch, e, chunk, window, kind)
            raise ValueError(
                f"a {prompt_len}-token prompt needs about {format_bytes(estimate.total)} beyond the weights "
                f"({estimate.describe()}) but {format_bytes(free)} is free on {self.device}; about {fits} tokens "
                f"would fit with these settings: shorten the prompt, set a SnapKV budget, lower the prefill chunk "
                f"size or run fewer prompts at once")
        return estimate.total

    def _prefill(self, seq: _Sequence, slot: int, step: DecodeStep, return_kept: bool, max_new: int) -> None:
        ids = seq.out.prompt_token_ids
        cache = step.cache
        start = time.perf_counter()
        view = PrefillView(cache, slot, self.policy, self.config.sliding_window, record_kept=return_kept)
        input_ids = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids, ctx=view, last_only=True, chunk_size=self.prefill_chunk_size)[:, -1]
        cache.lengths[slot] = view.kept_length
        token = sample_tokens(logits, [seq.params], [seq.generator])[0]
        seq.out.stats.update(prompt_tokens=len(ids), kept_tokens=view.kept_length,
                             prefill_s=time.perf_counter() - start)
        seq.out.kept = view.kept
        seq.add_token(token, self.tokenizer, self.eos_ids, max_new)
        step.tokens[slot] = token
        step.positions[slot] = len(ids)
        step.active[slot] = 0 if seq.out.finish_reason else 1

    # progress during prefill comes from a per-layer hook, so the model code stays free of UI concerns
    def _attach_layer_progress(self, progress: ProgressFn) -> None:
        layers = self.model.model.layers
        total = len(layers)
        self._hooks = [layer.register_forward_hook(
            lambda mod, inp, out, i=i: progress("prefill", i + 1, total) if inp[0].shape[1] > 1 else None)
            for i, layer in enumerate(layers)]

    def _detach_layer_progress(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
