"""What a client of the async engine front gets when the engine itself fails: an answer
(`EngineDeadError`), never a stream that waits for ever. Checked on `AsyncLLM` alone, without a
server, so that killing the engine harms no shared fixture."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from folovllm.config import EngineConfig
from folovllm.engine.async_llm import AsyncLLM, EngineDeadError
from folovllm.engine.llm_engine import LLMEngine
from folovllm.sampling_params import SamplingParams


class NotAnException(BaseException):
    """What escapes `except Exception` in the step thread: a lab's unwritten function (it is
    raised as `pytest.fail()` raises), a KeyboardInterrupt."""


def failing_engine(tiny_qwen3: Any, error: BaseException) -> AsyncLLM:
    engine = LLMEngine(str(tiny_qwen3), EngineConfig.for_stage(5, dtype="float32", max_model_len=128))

    def step() -> Any:
        raise error

    engine.step = step  # type: ignore[method-assign]
    return AsyncLLM(engine, "m")


async def first_output(async_llm: AsyncLLM) -> Any:
    stream = await async_llm.add_request("r0", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    async with stream:
        async for output in stream:
            return output


@pytest.mark.parametrize("error", [RuntimeError("broken step"), NotAnException("lab not written")],
                         ids=["Exception", "BaseException"])
def test_a_failing_step_ends_every_stream_with_engine_dead_error(tiny_qwen3, error):
    async def run() -> None:
        async_llm = failing_engine(tiny_qwen3, error)
        try:
            with pytest.raises(EngineDeadError, match="the engine stopped on an error"):
                await asyncio.wait_for(first_output(async_llm), timeout=30)  # a hang fails here
            assert async_llm.dead_error is error and not async_llm.is_running
            with pytest.raises(EngineDeadError):  # and no request is accepted after it
                await async_llm.add_request("r1", [1, 2], SamplingParams(max_tokens=2))
            task = async_llm._loop_task
            assert task is not None and task.done()
            if not isinstance(error, Exception):  # the loop does not swallow what it cannot handle
                assert task.exception() is error
        finally:
            async_llm._loop_task = None  # its end was checked above; nothing to cancel
            await async_llm.shutdown()

    asyncio.run(run())
