"""HF transformers as benchmarked peers, on the same checkpoint as folovllm: `model.generate` in
static batches (`hf-generate`) and HF's own continuous batching (`hf-generate-batch`)."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.systems.base import System
from benchmarks.workloads import Workload


class HFSystem(System):
    """What both HF peers share: the model, loaded once with `AutoModelForCausalLM` on the
    system's device and dtype; an EOS id it cannot emit; a count of its forward calls."""

    def load(self) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=getattr(torch, self.cfg.dtype))
        self.model.to(self.cfg.device).eval()
        self.description += (f" (transformers {transformers.__version__}, attn "
                             f"{self.model.config._attn_implementation})")
        cfg = self.model.config
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        # Never stop on EOS (ignore_eos). HF fills an `eos_token_id=None` back in from the model's
        # generation_config, and `min_new_tokens` would change the logits (it masks EOS to -inf),
        # so give generate() an EOS id the model cannot emit: its logits have `vocab_size`
        # columns, ids 0..vocab_size-1, so `vocab_size` itself never occurs. Every row then runs
        # exactly max_new_tokens steps on the same logits as folovllm's ignore_eos.
        self.never_eos = cfg.vocab_size
        # Count the model calls and the input shape of each (a forward pre-hook on HF's model,
        # ~1 us): HF has no engine stats to read.
        self.calls: list[tuple[int, ...]] = []
        self.model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.calls.append(tuple(ids.shape))


class HFGenerateSystem(HFSystem):
    """HF transformers `model.generate` on the same checkpoint, in static batches.

    The requests are cut, in workload order, into batches of `max_num_seqs` (what folovllm stage
    01 does); each batch is left-padded, with an attention mask, and generates
    `max_new_tokens = the batch's largest max_tokens` for every row. Greedy (or the workload's
    temperature with top_k/top_p off, as in vLLM). HF's own defaults otherwise: DynamicCache,
    the "sdpa" attention.
    """

    name = "hf-generate"
    description = "HF transformers model.generate, static batches, left-padded"

    def prepare(self, workload: Workload) -> Any:
        from transformers import GenerationConfig

        self.calls = []
        n = self.cfg.max_num_seqs
        batches = [workload.requests[i : i + n] for i in range(0, len(workload), n)]
        sampling = dict(do_sample=False)
        if workload.temperature > 0:
            sampling = dict(do_sample=True, temperature=workload.temperature, top_k=0, top_p=1.0)
        configs = [
            GenerationConfig(max_new_tokens=max(r.max_tokens for r in b), eos_token_id=self.never_eos,
                             pad_token_id=self.pad_token_id, **sampling)
            for b in batches
        ]
        return workload, batches, configs

    @torch.inference_mode()
    def execute(self, prepared: Any) -> list[list[int]]:
        _, batches, configs = prepared
        device, results = self.cfg.device, []
        for batch, gen_config in zip(batches, configs):
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, r in enumerate(batch):  # left padding
                ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
                mask[row, width - len(r.prompt_token_ids):] = 1
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=gen_config)
            new = out[:, width:].tolist()
            results += [row[: r.max_tokens] for row, r in zip(new, batch)]
        return results

    def stats(self, prepared: Any) -> dict[str, Any]:
        """The same counters as folovllm's EngineStats where they make sense, from the hook."""
        workload, batches, _ = prepared
        s = dict(num_forward_passes=len(self.calls), num_prompt_tokens=workload.num_prompt_tokens,
                 num_prompt_tokens_computed=0, num_generated_tokens=workload.num_output_tokens,
                 num_decode_row_steps=0, num_wasted_row_steps=0, kv_utilization=None)
        calls = iter(self.calls)
        for batch in batches:
            rows, width = next(calls)  # the prefill: [B, padded prompt length]
            s["num_prompt_tokens_computed"] += rows * width
            decodes = max(r.max_tokens for r in batch) - 1
            for _ in range(decodes):
                next(calls)
            s["num_decode_row_steps"] += rows * decodes
            # decode j (1-based) computes output token j+1; row i is idle once j >= max_tokens_i
            s["num_wasted_row_steps"] += sum(max(0, decodes - (r.max_tokens - 1)) for r in batch)
        return s


class HFGenerateBatchSystem(HFSystem):
    """HF transformers' own continuous batching (`transformers.generation.continuous_batching`,
    the engine behind `model.generate_batch`), on the same checkpoint.

    `generate_batch(inputs, generation_config)` takes ONE `max_new_tokens` for every request, so
    it would compute up to the longest request's length for every request: more work than the
    workload asks for. The manager it wraps takes a `max_new_tokens` per request
    (`ContinuousBatchingManager.add_request(input_ids, max_new_tokens=...)`), so this system does
    what `generate_batch` does, request by request: `model.init_continuous_batching(...)`, add
    every request with its own `max_tokens` and the never-emitted EOS id, start the generation
    thread, wait for every result. Same work as folovllm: exactly `max_tokens` per request.

    Sized like folovllm stage 02 (not HF's CPU defaults, which size the cache from the machine's
    RAM and spend ~30 s zeroing it): at most `max_num_seqs` requests per batch, 2048 tokens per
    batch, a paged cache of `max_num_seqs * 2048` tokens in pages of 256 (HF's default page
    size), no prefix sharing (the prompts share nothing; folovllm stage 02 has no prefix cache),
    no CUDA graphs, no torch.compile. Its scheduler mixes prefill and decode (and may split a
    prompt) in one batch, which folovllm's stage 02 does not (that is stage 05).

    Untimed: creating the manager and its cache (`manager.warmup()` builds the batch processor;
    there are no CUDA graphs to capture on CPU), and stopping the thread afterwards. Timed: adding
    the requests, starting the thread, receiving every finished result. The generation thread is
    pinned to the runner's torch thread count (torch.set_num_threads is per-thread for OpenMP).
    """

    name = "hf-generate-batch"
    description = "HF transformers continuous batching (generate_batch's manager), paged cache"
    page_size = 256
    max_batch_tokens = 2048
    max_len = 2048

    def load(self) -> None:
        super().load()
        self.threads = torch.get_num_threads()

    def prepare(self, workload: Workload) -> Any:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if workload.temperature > 0:
            raise ValueError("hf-generate-batch is set up for greedy workloads only")
        n = self.cfg.max_num_seqs
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size, num_blocks=n * self.max_len // self.page_size,
            max_batch_tokens=self.max_batch_tokens, max_requests_per_batch=n,
            allow_block_sharing=False, use_cuda_graph=False, use_async_batching=False,
        )
        gen_config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in workload.requests), do_sample=False,
            eos_token_id=self.never_eos, pad_token_id=self.pad_token_id,
        )
        manager = self.model.init_continuous_batching(gen_config, cb_config)
        manager.warmup()  # builds the batch processor and its paged cache now, untimed
        threads, loop = self.threads, manager._run_generation_loop

        def pinned_loop(*args: Any, **kwargs: Any) -> None:  # the generation thread: our thread count
            torch.set_num_threads(threads)
            loop(*args, **kwargs)  # (transformers 5.x passes use_inference_mode=...)

        manager._run_generation_loop = pinned_loop
        self.calls = []
        return workload, manager

    @torch.inference_mode()
    def execute(self, prepared: Any) -> list[list[int]]:
        workload, manager = prepared
        ids = [f"r{i}" for i in range(len(workload))]
        for rid, r in zip(ids, workload.requests):
            manager.add_request(list(r.prompt_token_ids), request_id=rid,
                                max_new_tokens=r.max_tokens, eos_token_id=self.never_eos)
        manager.start()
        results: dict[str, Any] = {}  # on an error the harness's release() stops the thread
        while len(results) < len(ids):
            out = manager.get_result(timeout=1)
            if out is not None:
                if out.is_finished():
                    if out.error is not None:
                        raise RuntimeError(f"hf-generate-batch: request {out.request_id} failed: {out.error}")
                    results[out.request_id] = out
            elif not manager.is_running():
                raise RuntimeError("hf-generate-batch: the generation thread stopped early "
                                   f"({len(results)}/{len(ids)} requests done)")
        return [list(results[rid].generated_tokens) for rid in ids]

    def release(self, prepared: Any) -> None:
        """Untimed: stop the generation thread (it idles once the last result is out)."""
        manager = prepared[1]
        if manager.is_running():
            manager.stop(block=True)
            manager.destroy()

    def stats(self, prepared: Any) -> dict[str, Any]:
        workload, manager = prepared
        return dict(num_forward_passes=len(self.calls), num_prompt_tokens=workload.num_prompt_tokens,
                    num_tokens_computed=sum(int(torch.tensor(c).prod()) for c in self.calls),
                    num_generated_tokens=workload.num_output_tokens, kv_utilization=None)
