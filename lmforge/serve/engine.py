"""Concurrent generation for the server: requests share the accelerator through transformers'
continuous batching (the engine `transformers serve` runs), each streamed token by token.

    engine = Engine(model, tokenizer, EngineSettings())
    engine.start()
    async with aclosing(engine.stream(prompt_ids, Sampling(max_tokens=64, temperature=0.7))) as steps:
        async for step in steps:          # step.tokens: every token so far; step.reason once done
            ...
    engine.stop()

Why transformers' ContinuousBatchingManager: a request joins the running batch at the next step
and leaves it when done, over a paged KV cache, so 32 clients cost little more than one; writing
that here would be a second, worse copy. What lmforge adds around it:

- Per-request sampling. The manager takes per-request temperature, top_p and top_k only when the
  base generation config creates those processors, so it is built with all three, and every
  request passes all three. Temperature 0 is greedy, sent as top_k=1: a temperature of 0 would
  divide by zero inside the shared batch and fail every request in it.
- A seeded request reproduces. The manager's sampler draws from one global generator shared by
  the whole batch, so a seed there cannot reproduce anything under load. A request with a seed
  (and a temperature above 0) runs instead on the seeded lane: `generate()` on a copy of the
  model, one request at a time, sampling by the Gumbel-max trick from a generator of its own
  (argmax of logits plus Gumbel noise draws from their softmax), so nothing else moves its draws.
- Cancellation. A request whose stream is closed early (a stop sequence, a client gone, a
  timeout) is cancelled in the manager at once, freeing its slot and its cache pages.
- Restart. A manager whose thread died is started again by the next request or health check
  (at most once every `restart_backoff_s`); until then requests get a 503.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any


class EngineError(RuntimeError):
    """The engine could not generate (stopped, or a failure inside the batch)."""


@dataclass(frozen=True)
class Sampling:
    """How one choice is generated. temperature 0: greedy; seed: reproducible (the seeded lane)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Step:
    """What a request has generated so far; `reason` ("stop": an end-of-sequence token, "length":
    max_tokens reached) once it is done."""

    tokens: list[int]
    reason: str | None = None


@dataclass(frozen=True)
class EngineSettings:
    """The continuous batch's size. None: transformers sizes it from free GPU memory, which on a
    CPU would be most of the machine's RAM, so the CPU gets CPU_DEFAULTS."""

    num_blocks: int | None = None
    max_batch_tokens: int | None = None
    page_size: int | None = None
    # CUDA graphs of the batch's steps. None: on when the model is on CUDA. transformers' own default
    # turns them off for SDPA attention (the attention lmforge loads), and eager steps leave an H100
    # waiting on Python: SmolLM2-135M's shape at 32 clients ran 462 tokens/s without, 1,613 with.
    cuda_graph: bool | None = None
    # torch.compile of the steps: 0 off; 1 default mode, dynamic shapes; 2 and 3 autotuned (3: static shapes).
    compile_level: int = 0

    CPU_DEFAULTS = {"num_blocks": 64, "max_batch_tokens": 1024, "page_size": 64}


class Engine:
    def __init__(self, model: Any, tokenizer: Any, settings: EngineSettings = EngineSettings()):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_ids = end_of_sequence_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self._manager = None
        self._numbers = itertools.count()
        self._lane_model = None  # the seeded lane's copy of the model, made on first use
        # One seeded request at a time, on a thread of its own: queued lane requests never hold the
        # threads asyncio.to_thread shares (prompt encoding, engine restarts).
        self._lane_runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-seeded")
        self._restart_lock = threading.Lock()
        self._last_restart = float("-inf")
        self.restarts = 0

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        base = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.95, top_k=50, max_new_tokens=16,
                                eos_token_id=self.eos_ids, pad_token_id=self._pad_id())
        self._manager = self.model.init_continuous_batching(generation_config=base,
                                                            continuous_batching_config=ContinuousBatchingConfig(**self._config()))
        self._manager.start()

    def _config(self) -> dict[str, Any]:
        from transformers import ContinuousBatchingConfig

        known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        settings = self.settings
        sizes = {"num_blocks": settings.num_blocks, "max_batch_tokens": settings.max_batch_tokens,
                 "page_size": settings.page_size}
        if self.model.device.type == "cpu":
            sizes = {k: v if v is not None else EngineSettings.CPU_DEFAULTS[k] for k, v in sizes.items()}
        page = sizes.pop("page_size")
        config = {"per_request_processors": True, **{k: v for k, v in sizes.items() if v is not None},
                  "default_compile_level": settings.compile_level}
        config["use_cuda_graph"] = self.uses_cuda_graphs()
        if page is not None:  # transformers 5.17 calls it block_size, later releases page_size
            config["page_size" if "page_size" in known else "block_size"] = page
        if "auto_switch_to_flash" in known:
            config["auto_switch_to_flash"] = False  # keep the attention the model was loaded with
        return config

    async def warm_up(self, batch_sizes: list[int], prompt_tokens: int = 16, new_tokens: int = 4) -> float:
        """Short greedy requests, `n` at once for each n in batch_sizes; the seconds it took. With
        CUDA graphs, each new batch shape is captured the first time it runs: done here, it is not
        paid by the first clients (on an H100, 32 clients' p95 time to first token went from 302 ms
        on a cold engine to 170 ms once their shapes had run)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        prompt = [self._pad_id()] * prompt_tokens

        async def one() -> None:
            async with aclosing(self.stream(prompt, Sampling(max_tokens=new_tokens, temperature=0.0))) as steps:
                async for _ in steps:
                    pass

        for n in batch_sizes:
            await asyncio.gather(*(one() for _ in range(n)))
        return loop.time() - started

    def stop(self) -> None:
        if self._manager is not None:
            self._manager.stop(block=True, timeout=30)
            self._manager = None

    # A manager whose thread died (a fatal error in a batch) is started again at most this often, so
    # a fault that kills every batch cannot keep the server restarting.
    restart_backoff_s = 30.0

    def restart_if_down(self) -> bool:
        """Start the manager again if it has died; True if it is running. Blocks while it starts
        (call it from a thread when on the event loop)."""
        if self.healthy():
            return True
        with self._restart_lock:
            if self.healthy():
                return True
            if time.monotonic() - self._last_restart < self.restart_backoff_s:
                return False
            self._last_restart = time.monotonic()
            cause = getattr(getattr(self._manager, "background_thread_status", None), "fatal_error", None)
            print(f"the generation engine stopped ({cause or 'no error recorded'}); starting it again",
                  file=sys.stderr, flush=True)
            try:
                self.stop()
            except Exception:  # noqa: BLE001 - a dead manager may fail to stop; a new one replaces it
                self._manager = None
            self.start()
            self.restarts += 1
        return self.healthy()

    def capacity_tokens(self) -> int | None:
        """The tokens one request's prompt and answer may take in the KV cache, where lmforge sized the
        cache (--kv-blocks, or the CPU's defaults); None where transformers sizes it from free GPU
        memory. A request larger than the whole cache could never be scheduled, and transformers
        treats that as fatal to the batch: every request in flight would fail with it."""
        from transformers import ContinuousBatchingConfig

        config = self._config()
        if "num_blocks" not in config:
            return None
        page = config.get("page_size", config.get("block_size"))
        if page is None:
            defaults = ContinuousBatchingConfig()
            page = getattr(defaults, "page_size", getattr(defaults, "block_size", None))
        return int(config["num_blocks"]) * int(page) if page else None

    def uses_cuda_graphs(self) -> bool:
        on_cuda = self.model.device.type == "cuda"
        return on_cuda if self.settings.cuda_graph is None else self.settings.cuda_graph and on_cuda

    def healthy(self) -> bool:
        manager = self._manager
        if manager is None or not manager.is_running():
            return False
        status = getattr(manager, "background_thread_status", None)
        return getattr(status, "fatal_error", None) is None

    # --- generation ---------------------------------------------------------------------------

    async def stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        """Steps of one request until it is done. Close the iterator early (aclosing) to cancel."""
        if sampling.seed is not None and sampling.temperature > 0:
            async for step in self._seeded(prompt_ids, sampling):
                yield step
            return
        if not self.healthy() and not await asyncio.to_thread(self.restart_if_down):
            raise EngineError("the generation engine is not running")
        manager = self._manager
        request_id = f"lmforge-{next(self._numbers)}"
        results: asyncio.Queue = asyncio.Queue()
        manager.register_result_handler(request_id, results.put_nowait)  # before add_request: no result is missed
        done = False
        try:
            added = manager.add_request(list(prompt_ids), request_id=request_id, max_new_tokens=sampling.max_tokens,
                                        streaming=True, eos_token_id=self.eos_ids, **self._processor_kwargs(sampling))
            if added is None:
                raise EngineError("the generation engine refused the request")
            while True:
                output = await results.get()
                if getattr(output, "error", None):
                    raise EngineError(f"generation failed: {output.error}")
                tokens = list(output.generated_tokens)
                if output.is_finished():
                    done = True
                    yield Step(tokens, self._reason(tokens, sampling))
                    return
                yield Step(tokens)
        finally:
            if not done:
                manager.cancel_request(request_id)
                with manager.output_router._lock:  # a cancelled request gets no last result to clean up after
                    manager.output_router.result_handlers.pop(request_id, None)

    def _processor_kwargs(self, sampling: Sampling) -> dict[str, Any]:
        if sampling.temperature == 0:
            return {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
        return {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p), "top_k": self.vocab_size}

    def _reason(self, tokens: list[int], sampling: Sampling) -> str:
        return "stop" if tokens and tokens[-1] in self.eos_ids else ("length" if len(tokens) >= sampling.max_tokens else "stop")

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_ids[0])

    # --- the seeded lane ----------------------------------------------------------------------

    async def _seeded(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        worker = loop.run_in_executor(self._lane_runner, self._seeded_generate, prompt_ids, sampling, steps, loop,
                                      cancelled)
        tokens: list[int] = []
        try:
            while True:
                item = await steps.get()
                if item is None:
                    break
                tokens.extend(item)
                yield Step(list(tokens))
            await worker  # raises what generate() raised
            yield Step(list(tokens), self._reason(tokens, sampling))
        finally:
            cancelled.set()

    def _seeded_generate(self, prompt_ids, sampling: Sampling, steps: asyncio.Queue, loop, cancelled) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
        from transformers.generation.streamers import BaseStreamer

        class Tokens(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() hands the prompt over first
                    self.first = False
                    return
                loop.call_soon_threadsafe(steps.put_nowait, value.reshape(-1).tolist())

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        try:
            if cancelled.is_set():  # its client left while it queued for the lane
                return
            with torch.inference_mode():
                model = self._lane()
                generator = torch.Generator(device=model.device).manual_seed(int(sampling.seed))
                processors = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
                if sampling.top_p < 1.0:
                    processors.append(TopPLogitsWarper(sampling.top_p))
                processors.append(GumbelNoise(generator))
                ids = torch.tensor([list(prompt_ids)], device=model.device)
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, logits_processor=processors,
                               stopping_criteria=StoppingCriteriaList([Cancelled()]), max_new_tokens=sampling.max_tokens,
                               eos_token_id=self.eos_ids, pad_token_id=self._pad_id(), streamer=Tokens())
        finally:
            loop.call_soon_threadsafe(steps.put_nowait, None)

    def _lane(self):
        # A copy: the continuous batch may have switched the served model to its paged attention.
        if self._lane_model is None:
            self._check_room_for_lane()
            lane = copy.deepcopy(self.model)
            lane.set_attn_implementation("sdpa")
            self._lane_model = lane.eval()
        return self._lane_model

    def _check_room_for_lane(self) -> None:
        """On a GPU the KV cache has taken most of the free memory (transformers sizes it so unless
        --kv-blocks says otherwise): a second copy of the model that does not fit is a clear error,
        not an out-of-memory failure on every seeded request."""
        import torch

        if self.model.device.type != "cuda":
            return
        needed = sum(t.numel() * t.element_size() for t in itertools.chain(self.model.parameters(), self.model.buffers()))
        free, _ = torch.cuda.mem_get_info(self.model.device)
        if needed * 1.1 > free:
            raise EngineError(f"a seeded request needs a second copy of the model ({needed / 2**30:.1f} GiB) and the GPU "
                              f"has {free / 2**30:.1f} GiB free: start the server with a smaller --kv-blocks, or send "
                              "requests without a seed")


class GumbelNoise:
    """Sampling as an argmax: logits plus Gumbel(0, 1) noise from the request's own generator. The
    argmax of (logits + noise) is distributed as softmax(logits), and filtered (-inf) logits stay out."""

    def __init__(self, generator):
        self.generator = generator

    def __call__(self, input_ids, scores):
        import torch

        uniform = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32)
        return scores.float() - torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))


def end_of_sequence_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the generation config's (a chat model's end-of-turn among them)
    and the tokenizer's."""
    found: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in found:
                found.append(int(token))
    return found
