"""Screenshots of the page for docs/web.md and the README (docs/img/web-*.png), from a real server and browser.

    python tools/web_screenshots.py [--out docs/img]

Starts the app on loopback (jobs on the host CPU, a tiny local model written to a temp dir: needs the train
extra) and drives Debian's chromium with Playwright: plans with memory bars (Llama-2-7B on an RTX 4090), the
method comparison and the published-claim checks (LLaMA-65B on an 80 GB A100), and a job running live (the
tiny model, cancelled once the picture is taken).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEY = "screenshot-key-" + "s" * 20


def union_clip(page: Any, selectors: list[str], pad: int = 8) -> dict[str, float]:
    boxes = [page.locator(s).bounding_box() for s in selectors]
    x0, y0 = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
    x1, y1 = max(b["x"] + b["width"] for b in boxes), max(b["y"] + b["height"] for b in boxes)
    scroll = page.evaluate("window.scrollY")  # boxes are viewport coordinates; full-page clips are page ones
    return {"x": x0 - pad, "y": y0 - pad + scroll, "width": x1 - x0 + 2 * pad, "height": y1 - y0 + 2 * pad}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from playwright.sync_api import sync_playwright

    from advisor.api.app import create_app
    from advisor.api.settings import Settings
    from advisor.api.testing import serve_in_thread
    from advisor.jobs.tiny import counting_examples, save_tiny_model, write_jsonl

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="web-shots-"))
    model = save_tiny_model(tmp / "models" / "tiny", initializer_range=0.2)
    train = write_jsonl(tmp / "train.jsonl", counting_examples(256, seed=0))
    (tmp / "data").mkdir()
    settings = Settings(
        data_dir=tmp / "data",
        api_keys=[KEY],
        model_roots=[str(tmp / "models")],
        job_gpu="cpu",
        job_cpu_threads=1,
        job_poll_interval_s=0.2,
        access_log=False,
    )
    with serve_in_thread(create_app(settings)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium)
        page = browser.new_page(viewport={"width": 1360, "height": 1000}, device_scale_factor=1)

        page.goto(f"{url}/?model=meta-llama%2FLlama-2-7b-hf&gpu=rtx-4090,a100-80gb&tokens=50000000&epochs=2")
        page.wait_for_selector("#compare .compare-grid")
        page.screenshot(path=str(args.out / "web-plans.png"))

        page.goto(f"{url}/?model=llama-65b&gpu=a100-80gb:1")
        page.wait_for_selector("#compare .compare-grid")
        page.locator("#compare").scroll_into_view_if_needed()
        page.screenshot(
            path=str(args.out / "web-methods.png"), full_page=True, clip=union_clip(page, ["#compare", "#claims"])
        )

        config = json.loads((model / "config.json").read_text())
        page.goto(f"{url}/?seq=32&gpu=rtx-4090&config={json.dumps(config)}")
        page.wait_for_selector(".plan")
        page.locator(".plan", has=page.locator("h3", has_text="LORA on")).first.locator(".launch-btn").click()
        page.fill("#api-key", KEY)
        page.fill("#job-model", str(model))
        page.set_input_files("#train-file", str(train))
        page.fill("#job-epochs", "100")
        page.fill("#job-lr", "50")
        page.click("#launch")
        page.wait_for_function(
            "document.querySelectorAll('#events li.metrics').length >= 40 || "
            "['failed','succeeded'].includes(document.querySelector('#job-status').textContent)",
            timeout=180_000,
        )
        time.sleep(1)
        page.locator("#job").scroll_into_view_if_needed()
        page.screenshot(path=str(args.out / "web-job.png"), full_page=True, clip=union_clip(page, ["#job"]))
        page.click("#cancel")
        page.wait_for_function("document.querySelector('#job-status').textContent === 'cancelled'", timeout=60_000)
        browser.close()
    for name in ("web-plans.png", "web-methods.png", "web-job.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
