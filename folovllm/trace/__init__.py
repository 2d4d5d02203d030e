"""The step trace: what the scheduler did in every engine step, recorded, exported and drawn
(`folovllm trace`, docs/trace.md).

    recorder.py   `StepTracer`: keeps the engine's per-step records; JSON and Perfetto exports;
                  `request_lanes` (each request's state per step)
    plot.py       the timeline pictures (matplotlib, imported only there)
    page.py       the live page of a running engine (`folovllm trace --serve`, `serve --trace`)
    workloads.py  the small named workloads of `folovllm trace`, and `replay`
"""
