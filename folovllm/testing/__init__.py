"""Test and demo infrastructure (`tiny_model`: random-weight checkpoints that load like a hub
model). The engine never imports it; the tests, the stages, the benchmarks and `folovllm demo` do."""
