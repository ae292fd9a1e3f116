"""The simulated referee: one full-size training step of a plan traced under FakeTensorMode.

    results    TraceResult, SimulatedEstimate (no torch)
    cache      the disk cache of traces, library versions, availability (no torch)
    runner     a trace in a child process under a deadline (no torch in the parent)
    estimator  SimulatedEstimator, simulate_ranked (no torch: traces import it when they run)
    trace      trace_step: the model from ``advisor.stack.build`` on fake tensors, counted (torch)
    meter      the live-bytes meter (torch)
    kernels    CUDA's choices a CPU fake trace must be told (torch)

Importing this package imports no torch; see docs/simulated.md.
"""

from advisor.simulated.cache import CACHE_ENV, TraceCache, cache_key, library_versions, unavailable_reason
from advisor.simulated.estimator import SimulatedEstimator, check_plan, simulate_ranked
from advisor.simulated.results import PHASES, SimulatedEstimate, TraceResult

__all__ = [
    "CACHE_ENV",
    "PHASES",
    "SimulatedEstimate",
    "SimulatedEstimator",
    "TraceCache",
    "TraceResult",
    "cache_key",
    "check_plan",
    "library_versions",
    "simulate_ranked",
    "unavailable_reason",
]
