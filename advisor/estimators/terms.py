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
TERMS_VERSION = 1


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
