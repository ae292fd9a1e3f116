"""``advisor calibrate``: measure this machine, fit a profile, install it where the advisor finds it.

    advisor calibrate [--device auto|cuda|cpu] [--budget quick|standard|thorough] [--out DIR]
    advisor calibrate --fit DIR        # refit DIR's measurements (after a killed or resumed run)
    advisor calibrate --fit DIR --with-jobs   # refit DIR's trials plus finished jobs' measurements
    advisor calibrate --list           # installed profiles

Importing this module imports neither torch nor scikit-learn nor the ``calibration`` package (the
advisor CLI imports it to build its parser); the calibration modules are imported when the command
runs, inside ``cmd_calibrate``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from advisor.errors import InvalidInputError
from advisor.profiles import PROFILE_SUBDIR, Profile, ProfileStore, default_data_dir

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


def cmd_calibrate(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.list:
        profiles = store.profiles()
        if args.json:
            print(json.dumps([p.summary() for p in profiles], indent=1))
        else:
            for p in profiles:
                h = p.held_out
                print(
                    f"{p.id}  {p.device_name}  {p.device_memory_gib:.1f} GiB  {p.created_at}  "
                    f"memory {h.memory_median_abs_pct_error:.1f}%  step time "
                    + ("-" if h.step_time_median_abs_pct_error is None else f"{h.step_time_median_abs_pct_error:.1f}%")
                )
            if not profiles:
                print(f"no profiles in {store.root}")
        return 0
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
        installed = None if args.no_install else store.save(profile)
        out_dir = run_dir
    else:
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
        )
        assert result.profile is not None
        profile, report, installed, out_dir = result.profile, result.report_path, result.profile_path, result.out_dir
    if args.json:
        print(
            json.dumps(
                {
                    **profile.summary(),
                    "run_dir": str(out_dir),
                    "report": str(report),
                    "installed": None if installed is None else str(installed),
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
    print(f"installed: {installed}" if installed else "not installed (--no-install)")
    return 0
