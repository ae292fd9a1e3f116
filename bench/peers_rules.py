"""The "weights x 4" rule of thumb as a peer of bench.peers.

"Training with Adam needs about four times the model's weights": the weights as stored (the plan's
dtype; for QLoRA the NF4 linears with their absmax constants and the rest in 16 bits, which is how the
rule is usually applied to adapters), times four. Under FSDP the weights are split over the GPUs, so
the rule is applied per GPU. It has an answer for every plan and no throughput.
"""

from __future__ import annotations

from advisor.units import DTYPE_BYTES
from bench.peers_base import GIB, PeerCase, sharded

#: NF4 stores 4 bits a weight plus one fp32 absmax per 64 weights (1 byte + 1/256 fp32 under double quant)
NF4_BYTES = 0.5


def weights_bytes(case: PeerCase) -> float:
    m, p = case.model, case.plan
    e = DTYPE_BYTES[p.dtype]
    if p.method == "qlora":
        n_lin = m.linear_weight_params
        absmax = n_lin / 64 * ((1 + 4 / 256) if p.double_quant else 4)
        return n_lin * NF4_BYTES + absmax + (m.param_count - n_lin) * e
    return m.param_count * e


def memory_gib(case: PeerCase) -> float:
    w = weights_bytes(case)
    if sharded(case.plan):
        w /= case.plan.num_gpus
    return 4 * w / GIB
