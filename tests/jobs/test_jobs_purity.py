"""The job layer the server imports stays light: torch and transformers only in the training process."""

import subprocess
import sys

SERVER_SIDE = [
    "advisor.jobs.spec",
    "advisor.jobs.files",
    "advisor.jobs.store",
    "advisor.jobs.config",
    "advisor.jobs.launchers",
    "advisor.jobs.webhooks",
    "advisor.jobs.manager",
    "advisor.jobs.service",
    "advisor.jobs.objects",
    "advisor.jobs.data",
    "advisor.api.routes.fine_tuning",
    "advisor.api.routes.files",
]


def test_server_side_job_modules_import_no_training_stack() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in SERVER_SIDE)
        + "bad = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate', 'ray') if m in sys.modules)\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
