"""folovllm's benchmark suite: timing lives here, never in `tests/` (see benchmarks/README.md)."""
