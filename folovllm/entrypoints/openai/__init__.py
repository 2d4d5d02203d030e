"""The OpenAI-compatible HTTP server (`folovllm serve`)."""
