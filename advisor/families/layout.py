"""The layout vocabulary: a block's linear layers and the generic LoRA roles (re-exported by advisor.specs)."""

from __future__ import annotations

from dataclasses import dataclass

#: Generic LoRA target roles; each family maps them to its real module names.
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Linear:
    """One nn.Linear (or Conv1D) inside a block: peft target name, roles it serves, shape."""

    name: str
    roles: tuple[str, ...]
    in_features: int
    out_features: int
    bias: bool
    #: "linear": an nn.Linear / Conv1D (what bitsandbytes quantises and peft's target_modules wrap);
    #: "experts": transformers' fused 3-D expert parameter (`experts` stacked matrices, an nn.Parameter of the
    #: Experts module: bitsandbytes leaves it in the compute dtype, peft reaches it only through
    #: target_parameters); "router": an MoE router's bare weight parameter (not an nn.Linear either);
    #: "linear-peft-remapped": an nn.Linear peft cannot target by name (see `lora_target`)
    kind: str = "linear"
    experts: int = 1

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.experts

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features * self.experts if self.bias else 0)

    @property
    def is_linear(self) -> bool:
        """An nn.Linear (what bitsandbytes quantises)."""
        return self.kind in ("linear", "linear-peft-remapped")

    @property
    def lora_target(self) -> bool:
        """An nn.Linear peft's target_modules can wrap. "linear-peft-remapped": one whose name peft 0.21 on
        transformers 5 remaps onto the fused experts (``gate_proj`` / ``up_proj`` / ``down_proj`` of the MoE types
        peft converts, e.g. DeepSeek's shared experts: advisor/families/moe.py), so it is never wrapped itself."""
        return self.kind == "linear"


@dataclass(frozen=True)
class Block:
    """`count` identical transformer blocks (a decoder stack, or T5's encoder / decoder stacks)."""

    kind: str  # "decoder", "encoder", "cross_decoder"
    count: int
    linears: tuple[Linear, ...]
    norm_params: int  # per block
    extra_params: int = 0  # per stack (e.g. T5 relative attention bias, once per stack)
