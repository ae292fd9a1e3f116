"""LoRA (peft): frozen base weights in the compute dtype, low-rank adapters trained in fp32."""

from __future__ import annotations

from advisor.methods.base import Method

METHOD = Method(
    name="lora",
    summary="frozen base weights, low-rank adapters (peft LoRA)",
    lighter="use qlora (4-bit base weights)",
)
