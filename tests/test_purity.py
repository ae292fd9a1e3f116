"""The pure core must not import torch, sklearn or fastapi (the service answers /recommend without them)."""

import subprocess
import sys

CORE = [
    "advisor.specs",
    "advisor.units",
    "advisor.errors",
    "advisor.catalog",
    "advisor.plans",
    "advisor.estimators.base",
    "advisor.estimators.analytical",
    "advisor.recommend",
    "advisor.cost",
    "advisor.study",
    "advisor.service",
    "advisor.cli",
]


def test_core_imports_no_heavy_libraries():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = sorted(m for m in ('torch', 'sklearn', 'fastapi', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure core imported: {out.stdout.strip()}"
