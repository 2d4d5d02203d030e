"""Offline tools that make the engine's inputs (`gptq_quantizer`: a float checkpoint in, a
GPTQ checkpoint out, behind `folovllm quantize`). The engine never imports them."""
