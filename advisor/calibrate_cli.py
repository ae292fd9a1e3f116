"""``advisor calibrate``: measure this machine, fit a profile, install it where the advisor finds it.

    advisor calibrate [--device auto|cuda|cpu] [--budget quick|standard|thorough] [--out DIR]
    advisor calibrate --fit DIR        # refit DIR's measurements (after a killed or resumed run)
    advisor calibrate --fit DIR --with-jobs   # refit DIR's trials plus finished jobs' measurements
    advisor calibrate --list           # installed profiles, and the stale and quarantined ones
    advisor calibrate --fit DIR --force          # install DIR's profile even if it does not beat the current one

A fitted profile replaces its device's current profile only if it beats it on held-out error and is fitted on
enough trials (``advisor.profiles.install_decision``); ``--force`` installs it anyway. Ctrl-C or SIGTERM cancels
a run: the running trial process is killed and the measurements so far are kept (resume with ``--out DIR``).

Importing this module imports neither torch nor scikit-learn nor the ``calibration`` package (the
advisor CLI imports it to build its parser); the calibration modules are imported when the command
runs, inside ``cmd_calibrate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from advisor.errors import InvalidInputError
from advisor.profiles import (
    MIN_INSTALL_GROUPS,
    MIN_INSTALL_TRIALS,
    PROFILE_SUBDIR,
    InstallDecision,
    Profile,
    ProfileStore,
    default_data_dir,
)

BUDGET_CHOICES = ("quick", "standard", "thorough")
#: error field -> flag, for the advisor CLI's one-line errors
FLAGS = {"device": "--device", "budget": "--budget", "run_dir": "--fit", "profile": "--fit", "data_dir": "--data-dir"}


def positive_int(text: str) -> int:
    """argparse type for a positive integer (advisor.cli's flags use it too)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="short real LoRA/QLoRA fine-tunes on this machine -> a fitted profile the estimates use",
        description="Runs a trial design (scaled-down Llama/Qwen2/GPT-2 architectures, lora, qlora and full), "
        "each trial in its own process, fits the analytical model's terms to the measurements and installs "
        "the profile in <data dir>/profiles. Estimates for this device then say calibrated:<profile id>.",
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--budget", choices=BUDGET_CHOICES, default="quick", help="quick: minutes; thorough: the most trials"
    )
    p.add_argument(
        "--out", help="run directory (default: <data dir>/calibrations/<timestamp>); an existing one resumes"
    )
    p.add_argument(
        "--fit", metavar="RUN_DIR", help="run no trials: refit RUN_DIR's measurements and rewrite its report"
    )
    p.add_argument(
        "--data-dir", help="where profiles are installed (default: $ADVISOR_DATA_DIR or ~/.local/share/tuneadvisor)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU: torch threads (default: torch's choice)")
    p.add_argument("--max-trials", type=positive_int, default=None, help="run at most this many trials of the design")
    p.add_argument("--no-install", action="store_true", help="write the profile into the run directory only")
    p.add_argument(
        "--force",
        action="store_true",
        help="install the profile even if it does not beat the device's current one on held-out error or is "
        f"fitted on fewer than {MIN_INSTALL_TRIALS} trials in {MIN_INSTALL_GROUPS} groups (by default it is then "
        "kept in the run directory only)",
    )
    p.add_argument(
        "--with-jobs",
        action="store_true",
        help="finished fine-tuning jobs' measurements (the service's job store: ADVISOR_DATABASE_URL, else "
        "<data dir>/advisor.db) join the fit where they ran on this device with the trials' memory meter; "
        "with --fit: refresh a profile from new jobs without rerunning trials",
    )
    p.add_argument("--list", action="store_true", help="list the installed profiles and exit")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _store(args: argparse.Namespace) -> ProfileStore:
    data = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    return ProfileStore(data / PROFILE_SUBDIR)


def _summary_lines(profile: Profile) -> list[str]:
    h = profile.held_out
    a = h.analytical

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}%"

    return [
        f"profile {profile.id}: {profile.device_name}, {h.n_trials} trials in {h.n_groups} configuration groups",
        "held-out median / max error (leave one configuration group out):",
        f"  memory     calibrated {pct(h.memory_median_abs_pct_error)} / {pct(h.memory_max_abs_pct_error)}"
        f"   analytical {pct(a.get('memory_median_abs_pct_error'))} / {pct(a.get('memory_max_abs_pct_error'))}",
        f"  step time  calibrated {pct(h.step_time_median_abs_pct_error)} / {pct(h.step_time_max_abs_pct_error)}"
        f"   analytical {pct(a.get('step_time_median_abs_pct_error'))} / {pct(a.get('step_time_max_abs_pct_error'))}"
        f"   ({h.n_step_time_trials} trials with quiet timing)",
    ]


def _list(store: ProfileStore, as_json: bool) -> int:
    """Installed profiles, then the ones never used: stale (other analytical terms) and quarantined (the file
    does not validate), each with why and where, so the operator can fix or remove it."""
    profiles, stale, quarantined = store.profiles(), store.stale_profiles(), store.quarantined()
    if as_json:
        doc = {
            "profiles": [p.summary() for p in profiles],
            "stale": [{**p.summary(), "reason": p.stale_reason()} for p in stale],
            "quarantined": [{"id": q.id, "file": str(store.root / q.file), "reason": q.reason} for q in quarantined],
        }
        print(json.dumps(doc, indent=1))
        return 0
    for p in profiles:
        h = p.held_out
        print(
            f"{p.id}  {p.device_name}  {p.device_memory_gib:.1f} GiB  {p.created_at}  "
            f"memory {h.memory_median_abs_pct_error:.1f}%  step time "
            + ("-" if h.step_time_median_abs_pct_error is None else f"{h.step_time_median_abs_pct_error:.1f}%")
        )
    for p in stale:
        print(f"STALE {p.id}  {p.device_name}: {p.stale_reason()}")
    for q in quarantined:
        print(f"QUARANTINED {q.id}  {store.root / q.file}: {q.reason} (not used: fix or remove the file)")
    if not (profiles or stale or quarantined):
        print(f"no profiles in {store.root}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.list:
        return _list(store, args.json)
    command = "advisor " + shlex.join(sys.argv[1:])
    try:
        from calibration.calibrate import calibrate
        from calibration.fit import write_fit
        from calibration.report import write_report
    except ImportError as exc:  # torch / transformers / scikit-learn / matplotlib missing
        raise InvalidInputError(
            f"calibration needs the calibrate extra (pip install 'tuneadvisor[calibrate]'): {exc}", field="device"
        ) from exc
    if args.fit:
        run_dir = Path(args.fit).expanduser()
        jobs = None
        if args.with_jobs:
            from calibration.feedback import read_job_feedback

            jobs = read_job_feedback(data_dir=args.data_dir)
        profile = write_fit(run_dir, command=command, jobs=jobs)
        report = write_report(run_dir)
        installed, decision = (None, None) if args.no_install else store.install(profile, force=args.force)
        out_dir = run_dir
    else:
        from calibration.runner import RunCancelled

        try:
            with _cancel_on_signals() as cancelled:
                result = calibrate(
                    device=args.device,
                    budget=args.budget,
                    out_dir=args.out,
                    data_dir=store.root.parent,
                    threads=args.threads,
                    max_trials=args.max_trials,
                    progress=not args.json,
                    install=not args.no_install,
                    command=command,
                    with_jobs=args.with_jobs,
                    force=args.force,
                    should_stop=cancelled.is_set,
                )
        except RunCancelled as exc:
            where = exc.out_dir or args.out
            print(
                f"calibration cancelled ({exc}); its measurements are kept in {where}: resume with "
                f"advisor calibrate --out {where}, or fit them with advisor calibrate --fit {where}",
                file=sys.stderr,
            )
            return 130
        assert result.profile is not None
        profile, report, installed, out_dir = result.profile, result.report_path, result.profile_path, result.out_dir
        decision = result.install_decision
    if args.json:
        print(
            json.dumps(
                {
                    **profile.summary(),
                    "run_dir": str(out_dir),
                    "report": str(report),
                    "installed": None if installed is None else str(installed),
                    "install_note": None if decision is None else decision.reason,
                    "job_measurements": profile.provenance.get("job_measurements", {}).get("summary"),
                },
                indent=1,
            )
        )
        return 0
    for line in _summary_lines(profile):
        print(line)
    if args.with_jobs:
        print("jobs: " + str(profile.provenance.get("job_measurements", {}).get("summary")))
    print(f"report: {report}")
    print(_install_line(installed, decision))
    return 0


def _install_line(installed: Path | None, decision: InstallDecision | None) -> str:
    if decision is None:
        return "not installed (--no-install)"
    if installed is None:
        return decision.reason  # "not installed: why, and how to install it anyway"
    return f"installed: {installed} ({decision.reason.removeprefix('installed: ')})"


@contextlib.contextmanager
def _cancel_on_signals() -> Iterator[threading.Event]:
    """SIGINT (Ctrl-C) and SIGTERM cancel the run: the running trial process is killed at once and run.json
    records the cancellation (the default KeyboardInterrupt would leave the trial running until the trial
    server is torn down). A second Ctrl-C interrupts as usual."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield event
        return

    def handler(signum: int, frame: object) -> None:
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
