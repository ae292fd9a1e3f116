"""What a traced step measured (``TraceResult``) and the Estimate that carries it (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from advisor.estimators.base import COMPONENTS, Estimate

PHASES = ("after_weights", "forward", "backward", "optimizer_step")


@dataclass(frozen=True)
class TraceResult:
    """What one traced run measured (bytes), independent of the GPU that will run it."""

    peak_bytes: int
    peak_phase: str  # forward | backward | optimizer_step | after_weights
    phases: dict[str, int]  # peak live bytes per phase (after_weights: live after loading)
    components: dict[str, int]  # live bytes by kind at the peak
    paged_bytes: int  # paged optimiser states (CUDA unified memory, not in the peak)
    param_count: int  # parameters of the built model (before quantisation packs them)
    ops: int
    seconds: float
    fake: bool
    versions: dict[str, str]
    notes: tuple[str, ...] = ()
    cpu_seconds: float = 0.0  # process CPU time of the trace: wall time on an idle core

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TraceResult:
        d = dict(d)
        d["notes"] = tuple(d.get("notes", ()))
        # the cache stores JSON with sorted keys: restore the order the breakdowns are shown in
        d["phases"] = {k: d["phases"][k] for k in PHASES if k in d["phases"]}
        d["components"] = {k: d["components"][k] for k in COMPONENTS if k in d["components"]}
        return cls(**d)


@dataclass(frozen=True)
class SimulatedEstimate(Estimate):
    """An Estimate whose memory comes from a trace; carries the phase breakdown."""

    phases: dict[str, int] = field(default_factory=dict)
    trace: TraceResult | None = None
