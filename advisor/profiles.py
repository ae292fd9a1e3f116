"""Calibration profiles: one device's fitted coefficients as JSON data, and the store that keeps them.

Why JSON and not a pickled model: the service loads profiles with neither scikit-learn nor torch
installed, a profile can be read and reviewed by a person, and nothing executable comes from disk.

A profile says which device it describes (name, memory, the full GpuSpec used for the fit), the
software it was measured with, the coefficients (see ``advisor.estimators.calibrated`` for what each
one multiplies), the range of inputs it was fitted on, its held-out errors (leave one configuration
group out) beside the analytical model's errors on the same trials, which meter produced each
measured figure, and provenance. Profiles live in ``<data dir>/profiles/<id>.json``; the data dir is
``$ADVISOR_DATA_DIR`` or ``~/.local/share/tuneadvisor`` (the API's ``Settings.data_dir``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from advisor.catalog import read_json_object
from advisor.errors import InvalidInputError
from advisor.estimators.terms import TERMS_VERSION
from advisor.plans import TrainingPlan
from advisor.specs import GpuSpec, ModelSpec

FORMAT = "tuneadvisor.calibration-profile/1"
PROFILE_SUBDIR = "profiles"
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
#: a profile matches a GPU whose memory is within this share of the profiled device's
MEMORY_TOLERANCE = 0.03


def default_data_dir() -> Path:
    """$ADVISOR_DATA_DIR, else ~/.local/share/tuneadvisor (the same default as the API settings)."""
    return Path(os.environ.get("ADVISOR_DATA_DIR") or "~/.local/share/tuneadvisor").expanduser()


@dataclass(frozen=True)
class HeldOut:
    """Leave-one-configuration-group-out errors in percent (absolute relative error of each trial)."""

    memory_median_abs_pct_error: float
    memory_max_abs_pct_error: float
    step_time_median_abs_pct_error: float | None
    step_time_max_abs_pct_error: float | None
    n_trials: int  # trials predicted for the memory figures
    n_step_time_trials: int = 0  # trials with a usable step time (quiet timing)
    n_groups: int = 0
    #: the analytical model alone on the same trials, same metrics (the gain from calibration)
    analytical: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class FittedRange:
    """The inputs the coefficients were fitted on; outside it an estimate says it extrapolates."""

    families: tuple[str, ...]
    methods: tuple[str, ...]
    dtypes: tuple[str, ...]
    optimizers: tuple[str, ...]
    attention: tuple[str, ...]
    numeric: dict[str, tuple[float, float]]  # name -> (min, max) over the fitted trials

    def outside(self, model: ModelSpec, plan: TrainingPlan) -> list[str]:
        """One phrase per input outside the fitted range (empty when inside)."""
        out: list[str] = []
        for name, value, allowed in (
            ("family", model.family, self.families),
            ("method", plan.method, self.methods),
            ("dtype", plan.dtype, self.dtypes),
            ("optimizer", plan.optimizer, self.optimizers),
            ("attention", plan.attention, self.attention),
        ):
            if allowed and value not in allowed:
                out.append(f"{name} {value} (fitted: {', '.join(allowed)})")
        for name, value in range_inputs(model, plan).items():
            lo_hi = self.numeric.get(name)
            if lo_hi is None:
                continue
            lo, hi = lo_hi
            if value > hi:
                out.append(f"{name} {_num(value)} above the fitted {_num(lo)}..{_num(hi)}")
            elif value < lo:
                out.append(f"{name} {_num(value)} below the fitted {_num(lo)}..{_num(hi)}")
        return out


def _num(v: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:g}"


def range_inputs(model: ModelSpec, plan: TrainingPlan) -> dict[str, float]:
    """The numeric inputs a fitted range is kept for."""
    return {
        "params": float(model.param_count),
        "hidden_size": float(model.hidden_size),
        "num_layers": float(model.total_layers),
        "vocab_size": float(model.vocab_size),
        "seq_len": float(plan.seq_len),
        "micro_batch": float(plan.micro_batch),
        "tokens_per_micro_step": float(plan.micro_batch * plan.seq_len),
    }


@dataclass(frozen=True)
class Profile:
    id: str
    created_at: str  # ISO 8601
    device: dict[str, Any]  # GpuSpec.to_dict() of the calibrated device
    software: dict[str, str | None]  # torch, cuda, transformers, peft, bitsandbytes, python
    coefficients: dict[str, Any]  # see advisor.estimators.calibrated
    fitted_range: FittedRange
    held_out: HeldOut
    meters: dict[str, str | None]  # figure -> the meter that produced it
    provenance: dict[str, Any]  # command, budget, trial counts, measurements digest, machine load
    format: str = FORMAT
    #: the version of the analytical terms the coefficients multiply (advisor.estimators.terms); profiles
    #: written before the field existed were fitted on version 1
    terms_version: int = TERMS_VERSION

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.id):
            raise InvalidInputError(f"profile id {self.id!r} must be a lowercase slug", field="profile")
        if self.format != FORMAT:
            raise InvalidInputError(f"unknown profile format {self.format!r} (expected {FORMAT})", field="profile")

    @property
    def stale(self) -> bool:
        """Fitted on other term definitions than this advisor computes: its coefficients would mis-scale."""
        return self.terms_version != TERMS_VERSION

    def stale_reason(self) -> str:
        return (
            f"calibration profile {self.id!r} ({self.device_name}) was fitted on analytical terms version "
            f"{self.terms_version}; this advisor computes version {TERMS_VERSION}, so its coefficients no longer "
            f"multiply what they were fitted on. To fix: refit it from its trials (advisor calibrate --fit RUN_DIR) "
            "or recalibrate, or delete it"
        )

    # ---- the device ------------------------------------------------------------------------------
    @property
    def gpu(self) -> GpuSpec:
        d = dict(self.device)
        d["aliases"] = tuple(d.get("aliases", ()))
        known = {f.name for f in fields(GpuSpec)}
        return GpuSpec(**{k: v for k, v in d.items() if k in known})

    @property
    def device_name(self) -> str:
        return str(self.device.get("name", ""))

    @property
    def device_memory_gib(self) -> float:
        return float(self.device.get("memory_gib", 0.0))

    def matches(self, gpu: GpuSpec) -> bool:
        """Same device: same id or same (normalised) name, and memory within MEMORY_TOLERANCE."""
        same = gpu.id == self.device.get("id") or _norm(gpu.name) == _norm(self.device_name)
        if not same or self.device_memory_gib <= 0:
            return False
        return abs(gpu.memory_gib - self.device_memory_gib) <= MEMORY_TOLERANCE * self.device_memory_gib

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fitted_range"]["numeric"] = {k: list(v) for k, v in self.fitted_range.numeric.items()}
        for k in ("families", "methods", "dtypes", "optimizers", "attention"):
            d["fitted_range"][k] = list(d["fitted_range"][k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        try:
            fr = dict(d["fitted_range"])
            fitted = FittedRange(
                families=tuple(fr.get("families", ())),
                methods=tuple(fr.get("methods", ())),
                dtypes=tuple(fr.get("dtypes", ())),
                optimizers=tuple(fr.get("optimizers", ())),
                attention=tuple(fr.get("attention", ())),
                numeric={k: (float(v[0]), float(v[1])) for k, v in fr.get("numeric", {}).items()},
            )
            return cls(
                id=str(d["id"]),
                created_at=str(d["created_at"]),
                device=dict(d["device"]),
                software=dict(d.get("software", {})),
                coefficients=dict(d["coefficients"]),
                fitted_range=fitted,
                held_out=HeldOut(**d["held_out"]),
                meters=dict(d.get("meters", {})),
                provenance=dict(d.get("provenance", {})),
                format=str(d.get("format", FORMAT)),
                terms_version=int(d.get("terms_version", 1)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInputError(f"not a calibration profile: {exc}", field="profile") from exc

    def summary(self) -> dict[str, Any]:
        """What a listing shows: identity, device, date and held-out errors."""
        return {
            "id": self.id,
            "created_at": self.created_at,
            "device": {"id": self.device.get("id"), "name": self.device_name, "memory_gib": self.device_memory_gib},
            "held_out": asdict(self.held_out),
            "software": self.software,
        }


def _norm(name: str) -> str:
    key = name.lower()
    for word in ("nvidia", "geforce", "tesla"):
        key = key.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", key)


def load_profile(path: str | Path) -> Profile:
    return Profile.from_dict(read_json_object(Path(path), "profile", "profile"))


class ProfileStore:
    """Profiles as JSON files in one directory; unreadable files are skipped (and reported by `problems`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.problems: dict[str, str] = {}
        self._cache: tuple[tuple, list[Profile]] | None = None

    @classmethod
    def default(cls) -> ProfileStore:
        return cls(default_data_dir() / PROFILE_SUBDIR)

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*.json"))

    def profiles(self) -> list[Profile]:
        """Every readable profile fitted on the current terms, newest first (re-read when files change)."""
        return [p for p in self.all() if not p.stale]

    def stale_profiles(self) -> list[Profile]:
        """Profiles fitted on other term definitions: never used, and an error for their own device."""
        return [p for p in self.all() if p.stale]

    def all(self) -> list[Profile]:
        files = self._files()
        key = tuple((f.name, f.stat().st_mtime_ns) for f in files)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        out: list[Profile] = []
        self.problems = {}
        for f in files:
            try:
                out.append(load_profile(f))
            except InvalidInputError as exc:
                self.problems[f.name] = str(exc)
        out.sort(key=lambda p: p.created_at, reverse=True)
        self._cache = (key, out)
        return out

    def get(self, profile_id: str) -> Profile:
        for p in self.profiles():
            if p.id == profile_id:
                return p
        raise InvalidInputError(f"no calibration profile {profile_id!r} in {self.root}", field="profile")

    def save(self, profile: Profile) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{profile.id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(profile.to_dict(), indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
        self._cache = None
        return path

    def match(self, gpu: GpuSpec) -> Profile | None:
        """The newest profile of this very device (name and memory), if any."""
        for p in self.profiles():
            if p.matches(gpu):
                return p
        return None

    def devices(self) -> list[GpuSpec]:
        """The calibrated devices (a CPU profile brings a device the catalog does not have)."""
        seen: dict[str, GpuSpec] = {}
        for p in self.profiles():
            try:
                g = p.gpu
            except (TypeError, ValueError, InvalidInputError):
                continue
            seen.setdefault(g.id, g)
        return list(seen.values())
