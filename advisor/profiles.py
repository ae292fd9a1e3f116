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
import math
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
#: provenance entries that name this machine's paths and the command line that made the profile: kept in the
#: file for the operator, left out of the documents the API serves (they tell a caller about the server's disk)
PRIVATE_PROVENANCE = ("command", "run_dir")


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
        except KeyError as exc:
            raise InvalidInputError(f"not a calibration profile: no {exc.args[0]!r} field", field="profile") from exc
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            raise InvalidInputError(f"not a calibration profile: {exc}", field="profile") from exc

    def public_dict(self) -> dict[str, Any]:
        """The document the API serves: the file's content less PRIVATE_PROVENANCE (the run directory and the
        command line stay in the file for the operator)."""
        d = self.to_dict()
        d["provenance"] = {k: v for k, v in d["provenance"].items() if k not in PRIVATE_PROVENANCE}
        return d

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
    """A profile file, parsed and validated (``validate_profile``): InvalidInputError naming what is wrong."""
    profile = Profile.from_dict(read_json_object(Path(path), "profile", "profile"))
    validate_profile(profile)
    return profile


# ---- validation --------------------------------------------------------------------------------------------
def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(errors: list[str], where: str, v: object, minimum: float | None = None, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not _is_number(v):
        errors.append(f"{where} must be a finite number{' or null' if optional else ''}, got {v!r}")
    elif minimum is not None and v < minimum:  # type: ignore[operator]
        errors.append(f"{where} must be >= {minimum:g}, got {v!r}")


def validate_profile(profile: Profile) -> None:
    """Refuse a profile the estimators cannot use as numbers: every coefficient group present and non-empty,
    every coefficient, held-out error and range bound a finite number (NaN and infinity refused), and a
    device that is a valid GpuSpec.

    Why at load and not where the numbers are used: a profile reaches every request that scales from it
    (the nearest calibrated device stands in for GPUs without a profile, and a calibrated CPU joins the
    catalog), so one bad file would otherwise fail unrelated requests with a 500 or answer null. Refused
    here, it is quarantined by the store: not used, and reported by /readyz and ``advisor calibrate --list``.
    """
    from advisor.estimators.calibrated import MEMORY_COEFFICIENTS, SPEED_TERMS  # it imports this module

    errors: list[str] = []
    coef = profile.coefficients
    memory, speed, runtime = coef.get("memory"), coef.get("speed"), coef.get("runtime", {})
    if not isinstance(memory, dict) or not memory:
        errors.append(f"coefficients.memory must be a non-empty object, got {memory!r}")
    else:
        missing = [n for n in MEMORY_COEFFICIENTS if n not in memory]
        if missing:
            errors.append(f"coefficients.memory has no {', '.join(missing)} (an older calibrated form: refit it)")
        scales = memory.get("activation_scale", {})
        if not isinstance(scales, dict):
            errors.append(f"coefficients.memory.activation_scale must be an object, got {scales!r}")
        else:
            for fam, v in scales.items():
                _number(errors, f"coefficients.memory.activation_scale.{fam}", v, minimum=0.0)
        if "logits_scale" in memory:
            _number(errors, "coefficients.memory.logits_scale", memory["logits_scale"], minimum=0.0)
        if "fixed_bytes" in memory:
            _number(errors, "coefficients.memory.fixed_bytes", memory["fixed_bytes"])
    if not isinstance(speed, dict) or not speed:
        errors.append(f"coefficients.speed must be a non-empty object, got {speed!r}")
    else:
        missing = [n for n in SPEED_TERMS if n not in speed]
        if missing:
            errors.append(f"coefficients.speed has no {', '.join(missing)} (an older calibrated form: refit it)")
        for name, v in speed.items():
            _number(errors, f"coefficients.speed.{name}", v, minimum=0.0)
    if not isinstance(runtime, dict):
        errors.append(f"coefficients.runtime must be an object, got {runtime!r}")
    else:
        for name, v in runtime.items():
            _number(errors, f"coefficients.runtime.{name}", v, minimum=0.0)
    h = profile.held_out
    for name in ("memory_median_abs_pct_error", "memory_max_abs_pct_error"):
        _number(errors, f"held_out.{name}", getattr(h, name), minimum=0.0)
    for name in ("step_time_median_abs_pct_error", "step_time_max_abs_pct_error"):
        _number(errors, f"held_out.{name}", getattr(h, name), minimum=0.0, optional=True)
    for name in ("n_trials", "n_step_time_trials", "n_groups"):
        v = getattr(h, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            errors.append(f"held_out.{name} must be a whole number >= 0, got {v!r}")
    if not isinstance(h.analytical, dict):
        errors.append(f"held_out.analytical must be an object, got {h.analytical!r}")
    else:
        for name, v in h.analytical.items():
            _number(errors, f"held_out.analytical.{name}", v, optional=True)
    for name, (lo, hi) in profile.fitted_range.numeric.items():
        if not (_is_number(lo) and _is_number(hi) and lo <= hi):
            errors.append(f"fitted_range.numeric.{name} must be finite numbers min <= max, got {[lo, hi]!r}")
    if not isinstance(profile.device.get("name"), str) or not profile.device.get("name"):
        errors.append("device.name must be a non-empty string")
    else:
        try:
            profile.gpu  # noqa: B018 (GpuSpec checks every rate is a positive finite number, naming it)
        except InvalidInputError as exc:
            errors.append(f"device: {exc}")
        except (TypeError, ValueError) as exc:
            errors.append(f"device: not a GPU spec ({exc})")
    if errors:
        raise InvalidInputError(f"calibration profile {profile.id!r} is invalid: " + "; ".join(errors), field="profile")


@dataclass(frozen=True)
class Quarantined:
    """A profile file the store refused: never used; /readyz counts it, ``advisor calibrate --list`` says why."""

    id: str  # the file name without .json (the profile's id when it is one)
    file: str  # the file name in the store's directory
    reason: str


# ---- installing ------------------------------------------------------------------------------------------
#: a fit on fewer trials or configuration groups than these does not become the device's profile (for every
#: caller of the service) unless it is installed explicitly: its held-out errors say little
MIN_INSTALL_TRIALS = 12
MIN_INSTALL_GROUPS = 3


@dataclass(frozen=True)
class InstallDecision:
    """Whether a fitted profile becomes its device's profile, and why (shown to whoever ran the calibration)."""

    install: bool
    reason: str
    replaces: str | None = None  # the device's current profile, when there is one


def _beats(new: float | None, old: float | None) -> bool | None:
    """new <= old (None: not comparable, one of them has no figure)."""
    if new is None or old is None:
        return None
    return new <= old


def install_decision(candidate: Profile, current: Profile | None, force: bool = False) -> InstallDecision:
    """A calibration that would replace a device's profile must beat it on held-out error (memory, and step time
    where both have it; a candidate without step-time figures never replaces one that has them), and a fit
    smaller than MIN_INSTALL_TRIALS / MIN_INSTALL_GROUPS is never installed silently; `force` installs anyway
    (the caller decides who may: the CLI's operator, or an API key named in ADVISOR_CALIBRATION_INSTALL_KEYS)."""
    replaces = current.id if current is not None else None
    h = candidate.held_out
    if force:
        return InstallDecision(True, "installed explicitly (force)", replaces)
    if h.n_trials < MIN_INSTALL_TRIALS or h.n_groups < MIN_INSTALL_GROUPS:
        return InstallDecision(
            False,
            f"not installed: fitted on {h.n_trials} trials in {h.n_groups} configuration groups, fewer than the "
            f"{MIN_INSTALL_TRIALS} trials in {MIN_INSTALL_GROUPS} groups a profile needs to be used for everyone; "
            "install it explicitly if you mean to (advisor calibrate --fit RUN_DIR --force)",
            replaces,
        )
    if current is None:
        return InstallDecision(True, "installed: the device had no profile", None)
    c = current.held_out
    memory = _beats(h.memory_median_abs_pct_error, c.memory_median_abs_pct_error)
    step = _beats(h.step_time_median_abs_pct_error, c.step_time_median_abs_pct_error)
    if step is None and c.step_time_median_abs_pct_error is not None:
        step = False  # the current profile predicts step time and the candidate cannot say it does better
    if memory and step is not False:
        return InstallDecision(True, f"installed: its held-out errors are no worse than {current.id}'s", replaces)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}%"

    return InstallDecision(
        False,
        f"not installed: held-out median error memory {pct(h.memory_median_abs_pct_error)}, step time "
        f"{pct(h.step_time_median_abs_pct_error)} does not beat the device's profile {current.id} (memory "
        f"{pct(c.memory_median_abs_pct_error)}, step time {pct(c.step_time_median_abs_pct_error)}); install it "
        "explicitly if you mean to replace it (advisor calibrate --fit RUN_DIR --force)",
        replaces,
    )


class ProfileStore:
    """Profiles as JSON files in one directory. A file that does not parse or validate is quarantined: it is
    left on disk for the operator (the store only reads) but never used, and listed by ``quarantined``
    (``problems``: file name -> reason)."""

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
        files, stamps = [], []
        for f in self._files():
            try:  # a file removed since the listing is simply gone
                stamps.append((f.name, f.stat().st_mtime_ns))
                files.append(f)
            except OSError:
                continue
        key = tuple(stamps)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        out: list[Profile] = []
        problems: dict[str, str] = {}
        for f in files:
            try:
                out.append(load_profile(f))
            except InvalidInputError as exc:
                problems[f.name] = str(exc)
            except (OSError, RecursionError) as exc:  # unreadable, or nested beyond the parser
                problems[f.name] = f"{type(exc).__name__}: {exc}"
        out.sort(key=lambda p: p.created_at, reverse=True)
        self.problems = problems
        self._cache = (key, out)
        return out

    def quarantined(self) -> list[Quarantined]:
        """The profile files refused at load (see ``validate_profile``), by file name."""
        self.all()
        return [Quarantined(id=name.removesuffix(".json"), file=name, reason=r) for name, r in self.problems.items()]

    def get(self, profile_id: str) -> Profile:
        for p in self.profiles():
            if p.id == profile_id:
                return p
        raise InvalidInputError(f"no calibration profile {profile_id!r} in {self.root}", field="profile")

    def save(self, profile: Profile) -> Path:
        """Install `profile` (validated first: a fit that produced a NaN is refused, not installed)."""
        validate_profile(profile)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{profile.id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(profile.to_dict(), indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
        self._cache = None
        return path

    def install(self, profile: Profile, force: bool = False) -> tuple[Path | None, InstallDecision]:
        """Save `profile` if ``install_decision`` lets it replace its device's current profile (or `force`)."""
        try:
            gpu = profile.gpu
        except (TypeError, ValueError, InvalidInputError) as exc:
            msg = f"calibration profile {profile.id!r} has no valid device: {exc}"
            raise InvalidInputError(msg, field="profile") from exc
        current = next((p for p in self.profiles() if p.id != profile.id and p.matches(gpu)), None)
        decision = install_decision(profile, current, force)
        return (self.save(profile) if decision.install else None), decision

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
