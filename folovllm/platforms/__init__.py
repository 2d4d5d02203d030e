"""What the machine can run (vLLM's `vllm/platforms/`): today the CPU's instruction sets."""
