"""The named, GPU-independent terms of one plan: what every estimator that joins the search produces.

``TERMS_VERSION`` names the definitions of these terms (and of the calibration features derived from
them in ``advisor.estimators.calibrated``). A calibration profile records the version it was fitted
on; a profile of another version is refused loudly (``advisor.profiles``) rather than silently
mis-scaled. Bump it whenever a term's definition changes what it counts, and refit the committed
profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: version of the term definitions; profiles fitted on another version are refused
TERMS_VERSION = 2  # 2: speed counts (SpeedCounts), allocator slack, corrected-analytical calibration (issue 10)


@dataclass(frozen=True)
class SpeedCounts:
    """GPU-independent counts the speed model needs beyond FLOPs and bytes (scalars for one plan; the
    recommend search stacks them into one numpy array per field, ``SpeedCounts.stack``).

    * ``host_ops``: operations the host issues per micro-step (each a Python/dispatcher call and a kernel
      launch): blocks x passes x ops per block by method (LoRA adds its adapter ops per adapted module,
      QLoRA its dequantisation kernels), plus the embedding, loss and optimiser-step ops. A GPU step cannot
      be shorter than the time the host takes to issue them (the host-bound floor).
    * ``attention_flops_per_token``: the share of ``flops_per_token`` the attention kernels do (not GEMMs:
      their efficiency depends on the sequence length).
    * ``seq_len``: tokens per sequence (the attention kernels' efficiency).
    * ``gemm_n``: output width of the widest block GEMM (the MLP's), for tile/wave quantisation on the GPU.
    * ``gather_bytes``: FSDP all-gather bytes received per GPU per micro-step (forward, backward and, under
      checkpointing, the recompute), prefetched block by block under the compute.
    * ``grad_comm_bytes``: gradient reduction bytes per GPU per micro-step (DDP all-reduce or FSDP
      reduce-scatter), amortised over the micro-steps of one optimiser step where the stack skips it on the
      others (``no_sync``).
    * ``collectives``: collective calls per micro-step (each pays the link's latency).
    * ``internode_gather_bytes`` / ``internode_grad_bytes``: bytes each node sends to the others per micro-step
      when the plan spans nodes (hierarchical collectives: the inter-node step moves (N-1)/N of the payload
      per node over its network; ``gather_bytes`` / ``grad_comm_bytes`` then hold the intra-node step, (g-1)/g).
      0 on one node.
    """

    host_ops: float = 0.0
    attention_flops_per_token: float = 0.0
    seq_len: float = 0.0
    gemm_n: float = 0.0
    gather_bytes: float = 0.0
    grad_comm_bytes: float = 0.0
    collectives: float = 0.0
    internode_gather_bytes: float = 0.0
    internode_grad_bytes: float = 0.0

    @classmethod
    def stack(cls, rows: list[SpeedCounts]):
        """One numpy array per field over `rows` (the vectorised search)."""
        import numpy as np

        return cls(**{f: np.array([getattr(r, f) for r in rows], dtype=float) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PlanTerms:
    """Bytes, FLOPs and traffic of one plan, before any GPU: the input of the device layer."""

    components: dict[str, int]  # memory breakdown without runtime_overhead (slack + context depend on the device)
    allocated: float  # allocated peak (bytes per GPU)
    static: float  # weights, adapters, optimiser states: allocated once, no allocator slack
    paged: float  # paged optimiser states (unified memory, not in the totals)
    peak_phase: str
    flops_per_token: float
    memory_traffic_bytes: float  # per micro-step, per GPU
    comm_bytes: float  # per micro-step, per GPU
    passes: int  # forward passes per micro-step + 1 (3 with checkpointing)
    notes: tuple[str, ...]
    # every term before the max() of the two phases, by name: the features calibration fits
    terms: dict[str, float] = field(default_factory=dict)
    speed: SpeedCounts = field(default_factory=SpeedCounts)  # the speed model's other counts
    #: caching-allocator slack (bytes, reserved - allocated at the peak) counted from the plan's tensor sizes;
    #: NaN where the estimator does not count it (the device layer then applies its fitted transient share)
    allocator_slack: float = float("nan")
