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

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Block:
    """`count` identical transformer blocks (a decoder stack, or T5's encoder / decoder stacks)."""

    kind: str  # "decoder", "encoder", "cross_decoder"
    count: int
    linears: tuple[Linear, ...]
    norm_params: int  # per block
    extra_params: int = 0  # per stack (e.g. T5 relative attention bias, once per stack)
