"""Stage 11: multi-LoRA serving (vLLM's `vllm/lora/`): many fine-tuned adapters over one base
model, in one batch.

    request.py         LoRARequest: which adapter a request runs under (name, id, path)
    peft_helper.py     read and check a PEFT checkpoint (adapter_config.json + safetensors)
    lora_model.py      LoRAModel: one adapter's A/B pairs by module, checked against the base
    punica_wrapper.py  the per-step token -> slot layout and the batched shrink/expand (SGMV,
                       BGMV), beside the plain reference loop
    layers.py          the LoRA wrappers of the fused and plain linear layers (qkv, o, gate_up,
                       down), holding each slot's stacked A and B
    worker_manager.py  the worker's side: adapters on the CPU (an LRU), slots filled on demand
    engine_manager.py  the engine's side: validate at add_request, give each step's adapters
                       a slot (an LRU over slots), put the slots in the InputBatch
    scheduling.py      the scheduler's rule: at most max_loras distinct adapters running

With `enable_lora=False` none of this is built: the engine holds `NoLoRAManager` and the
scheduler `NoLoRAAdmission`, do-nothing objects, and the model keeps its plain layers.
"""
