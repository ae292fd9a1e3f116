"""What the service costs around a training job: POST -> first step, and throughput vs the same run by hand.

    python -m bench.job_overhead            # writes bench/results/job_overhead.{json,md}

For each model size, the same LoRA training (same data, plan, batch, seed, one torch thread) runs four
ways, one after the other on this machine:

1. through the service: a real uvicorn server in this process, POST /v1/files + /v1/fine_tuning/jobs,
   followed to `succeeded`;
2. by hand with our entry point: ``python -m advisor.jobs.train --job-dir`` on a copy of that job's
   job.json (no server; same events, checkpoints and bookkeeping);
3. a bare loop: a fresh interpreter that builds the same model with ``advisor.stack.build`` and runs the
   same batches with nothing else (no events, no checkpoints, no metrics);
4. TRL's ``SFTTrainer`` by hand: a fresh interpreter, the same built model and optimiser, the same
   packed sequences as a pre-tokenised dataset (``input_ids`` and our labels, ``skip_prepare_dataset``),
   ``SFTTrainer.train()`` with the plan's micro-batch and accumulation, fp32 and no activation
   checkpointing like the job (SFTConfig defaults to bf16 and checkpointing: both set off). It attends
   across the examples of a packed block (TRL's padding-free packing is boundary-safe only under
   flash-attention); the job, transformers' Trainer underneath, adds the block-diagonal masks. Both count
   tokens without padding.

No GPU in the session that produced bench/results/job_overhead.*: CPU numbers only.

Latency is split into phases from the job's own timestamps (the reconciler's launch time, then the
training process' events): POST -> launched (validation, queue, spawn), launched -> process up (the
interpreter and ``import torch``), up -> model ready (tokenizer, data, transformers/peft import, model
build), ready -> first step done. Throughput is trained tokens per second over the steps after the
first (warm-up), medians. Timings on a shared 2-core CPU move with the load: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path("bench/results/job_overhead")
KEY = "bench-key-" + "z" * 24
SIZES = {
    # name: (tiny model config overrides, seq_len, batch, epochs)
    "tiny (h64, 2 layers)": ({}, 32, 4, 2),
    "small (h256, 4 layers)": ({"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}, 128, 4, 2),
}  # fmt: skip


def _events(job_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (job_dir / "events.jsonl").read_text().splitlines() if x.strip()]


def _steady_tokens_per_s(evs: list[dict[str, Any]]) -> tuple[float, float]:
    steps = [e["data"] for e in evs if e["type"] == "metrics"][1:]
    return statistics.median(s["tokens_per_s"] for s in steps), statistics.median(s["step_time_s"] for s in steps)


def via_service(model_dir: Path, data: Path, seq: int, batch: int, epochs: int, work: Path) -> dict[str, Any]:
    import httpx

    from advisor.api.app import create_app
    from advisor.api.settings import Settings
    from advisor.api.testing import serve_in_thread

    settings = Settings(
        data_dir=work / "service",
        api_keys=[KEY],
        model_roots=[str(model_dir.parent)],
        job_gpu="cpu",
        job_cpu_threads=1,
        job_poll_interval_s=1.0,  # the default
        access_log=False,
    )
    (work / "service").mkdir(parents=True)
    app = create_app(settings)
    h = {"Authorization": f"Bearer {KEY}"}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=h, timeout=60) as c:
        with data.open("rb") as fh:
            fid = c.post("/v1/files", files={"file": ("t.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
        body = {
            "model": str(model_dir),
            "training_file": fid,
            "hyperparameters": {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": 10},
            "method": {"type": "lora", "seq_len": seq, "gradient_checkpointing": False, "lora": {"r": 8}},
        }
        t_post = time.time()
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        t_answer = time.time()
        while (job := c.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(0.2)
        t_done = time.time()
        assert job["status"] == "succeeded", job["error"]
        row = app.state.jobs.get().store.get_job(job["id"])
    job_dir = work / "service" / "jobs" / job["id"]
    evs = _events(job_dir)
    up = evs[0]["ts"]
    ready = next(e["ts"] for e in evs if e["message"].startswith("Model ready"))
    first = next(e for e in evs if e["type"] == "metrics")
    tps, step = _steady_tokens_per_s(evs)
    launched = row["handle"]["started_at"]
    return {
        "job_id": job["id"],
        "job_dir": str(job_dir),
        "post_answer_s": t_answer - t_post,
        "post_to_launched_s": launched - t_post,
        "launched_to_process_up_s": up - launched,
        "process_up_to_model_ready_s": ready - up,
        "model_ready_to_first_step_s": first["ts"] - ready,
        "post_to_first_step_s": first["ts"] - t_post,
        "first_step_s": first["data"]["step_time_s"],
        "post_to_succeeded_s": t_done - t_post,
        "steady_tokens_per_s": tps,
        "steady_step_time_s": step,
        "steps": job["measured"]["steps"],
        "estimate_tokens_per_s": job["estimate"]["tokens_per_s"],
    }


def by_entry_point(service_job_dir: Path, work: Path) -> dict[str, Any]:
    d = work / "direct"
    d.mkdir()
    spec = json.loads((service_job_dir / "job.json").read_text())
    spec["job_id"] = "ftjob-direct0000001"
    (d / "job.json").write_text(json.dumps(spec))
    env = {**os.environ, "ADVISOR_TRAIN_THREADS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "advisor.jobs.train", "--job-dir", str(d)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    evs = _events(d)
    first = next(e for e in evs if e["type"] == "metrics")
    tps, step = _steady_tokens_per_s(evs)
    return {"start_to_first_step_s": first["ts"] - t0, "steady_tokens_per_s": tps, "steady_step_time_s": step}


def _fresh_interpreter(flag: str, service_job_dir: Path) -> dict[str, Any]:
    """`python -m bench.job_overhead <flag> job.json` with one thread; its last stdout line is the result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.job_overhead", flag, str(service_job_dir / "job.json")],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def by_hand(service_job_dir: Path) -> dict[str, Any]:
    """The bare loop, in a fresh interpreter with one thread (see `_hand_main`)."""
    return _fresh_interpreter("--hand-loop", service_job_dir)


def _job_setup(job_json: str) -> tuple[Any, Any, Any, list[Any], Any]:
    """What both runs by hand start from, as the job does: the spec, its tokenizer, the packed sequences
    and the model built by advisor.stack (torch on one thread)."""
    import torch
    from transformers import AutoTokenizer

    from advisor.jobs import data as D
    from advisor.jobs.files import read_examples
    from advisor.jobs.spec import JobSpec
    from advisor.stack.build import build

    torch.set_num_threads(1)
    spec = JobSpec.from_dict(json.loads(Path(job_json).read_text()))
    tok = AutoTokenizer.from_pretrained(spec.source.ref)
    rows = list(read_examples(spec.training_file))
    train = D.pack(D.encode_all(tok, rows, "chat"), spec.plan.seq_len)
    built = build(spec.source.ref, spec.plan, "cpu", seed=spec.seed, learning_rate=spec.learning_rate)
    return torch, spec, tok, train, built


def _hand_main(job_json: str) -> None:
    """Same model, plan, tokens, batches and optimiser as the job; nothing but forward, backward, step."""
    t0 = time.time()
    torch, spec, tok, train, built = _job_setup(job_json)
    from advisor.jobs import data as D

    times, tokens, first_at = [], [], None
    for epoch in range(spec.n_epochs):
        for batch in D.epoch_batches(len(train), spec.batch_size, spec.seed, epoch):
            t = time.perf_counter()
            n = 0
            for i in range(0, len(batch), spec.plan.micro_batch):
                micro = [train[j] for j in batch[i : i + spec.plan.micro_batch]]
                ids, labels = D.pad_batch(micro, tok.pad_token_id)
                n += sum(len(s.ids) for s in micro)
                built.forward_backward(torch.tensor(ids), torch.tensor(labels))
            built.optimizer_step()
            times.append(time.perf_counter() - t)
            tokens.append(n)
            first_at = first_at or time.time()
    steady = list(zip(times, tokens, strict=True))[1:]
    result = {
        "start_to_first_step_s": first_at - t0,
        "steady_tokens_per_s": statistics.median(n / t for t, n in steady),
        "steady_step_time_s": statistics.median(t for t, _ in steady),
    }
    print(json.dumps(result))


def by_sft(service_job_dir: Path) -> dict[str, Any]:
    """TRL's SFTTrainer, in a fresh interpreter with one thread (see `_sft_main`)."""
    return _fresh_interpreter("--sft", service_job_dir)


def _sft_main(job_json: str) -> None:
    """Same model, optimiser and sequences as the job, trained by TRL's SFTTrainer as one would by hand."""
    t0 = time.time()
    _, spec, tok, train, built = _job_setup(job_json)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from advisor.jobs import data as D

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []
            self.first_at: float | None = None
            self._t = 0.0
            self._seen = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self._t)
            self.tokens.append(state.num_input_tokens_seen - self._seen)
            self._seen = state.num_input_tokens_seen
            self.first_at = self.first_at or time.time()

    clock = Clock()
    dataset = Dataset.from_list([{"input_ids": s.ids, "labels": D.loss_labels(s)} for s in train])
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sft-"),
        per_device_train_batch_size=spec.plan.micro_batch,
        gradient_accumulation_steps=spec.plan.grad_accum,
        num_train_epochs=spec.n_epochs,
        learning_rate=spec.learning_rate,
        max_length=spec.plan.seq_len,
        bf16=False,
        activation_checkpointing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        seed=spec.seed,
    )
    trainer = SFTTrainer(
        model=built.model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        optimizers=(built.optimizer, None),
        callbacks=[clock],
    )
    trainer.train()
    steady = list(zip(clock.times, clock.tokens, strict=True))[1:]
    print(
        json.dumps(
            {
                "start_to_first_step_s": (clock.first_at or t0) - t0,
                "steady_tokens_per_s": statistics.median(n / t for t, n in steady),
                "steady_step_time_s": statistics.median(t for t, _ in steady),
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(OUT), help="output path without extension (default bench/results/job_overhead)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of the four runs per size (default 3)")
    p.add_argument("--hand-loop", help=argparse.SUPPRESS)
    p.add_argument("--sft", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hand_loop:
        _hand_main(args.hand_loop)
        return 0
    if args.sft:
        _sft_main(args.sft)
        return 0
    from advisor.jobs.tiny import counting_examples, save_tiny_model, write_jsonl

    rows = []
    load_start = os.getloadavg()
    for name, (overrides, seq, batch, epochs) in SIZES.items():
        work = Path(tempfile.mkdtemp(prefix="job-overhead-"))
        try:
            model = save_tiny_model(work / "models" / "model", initializer_range=0.2, **overrides)
            data = write_jsonl(work / "train.jsonl", counting_examples(128, seed=0))
            runs = []
            for i in range(args.rounds):  # interleaved, so a burst of load hits all four alike
                round_dir = work / f"round{i}"
                svc = via_service(model, data, seq, batch, epochs, round_dir)
                job_dir = Path(svc["job_dir"])
                runs.append((svc, by_entry_point(job_dir, round_dir), by_hand(job_dir), by_sft(job_dir)))
            rows.append(_summarise(name, seq, batch, runs))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    doc = {
        "command": "python -m bench.job_overhead",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "torch_threads_per_job": 1,
        "reconciler_poll_interval_s": 1.0,
        "rounds": args.rounds,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0


def _med(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summarise(name: str, seq: int, batch: int, runs: list[tuple[dict, dict, dict, dict]]) -> dict[str, Any]:
    """Medians (with min and max) over the rounds; ratios are taken per round, then their median."""
    svc_keys = [k for k, v in runs[0][0].items() if isinstance(v, float)]
    return {
        "size": name,
        "seq_len": seq,
        "batch": batch,
        "steps": runs[0][0]["steps"],
        "service": {k: _med([r[0][k] for r in runs]) for k in svc_keys},
        "entry_point_by_hand": {k: _med([r[1][k] for r in runs]) for k in runs[0][1]},
        "bare_loop": {k: _med([r[2][k] for r in runs]) for k in runs[0][2]},
        "sft_trainer_by_hand": {k: _med([r[3][k] for r in runs]) for k in runs[0][3]},
        "throughput_service_vs_sft_trainer": _med(
            [r[0]["steady_tokens_per_s"] / r[3]["steady_tokens_per_s"] for r in runs]
        ),
        "first_step_service_minus_sft_trainer_s": _med(
            [r[0]["post_to_first_step_s"] - r[3]["start_to_first_step_s"] for r in runs]
        ),
        "throughput_service_vs_entry_point": _med(
            [r[0]["steady_tokens_per_s"] / r[1]["steady_tokens_per_s"] for r in runs]
        ),
        "throughput_service_vs_bare_loop": _med(
            [r[0]["steady_tokens_per_s"] / r[2]["steady_tokens_per_s"] for r in runs]
        ),
        "first_step_service_minus_bare_loop_s": _med(
            [r[0]["post_to_first_step_s"] - r[2]["start_to_first_step_s"] for r in runs]
        ),
    }


def render(doc: dict[str, Any]) -> str:
    lines = [
        "# Service overhead around a fine-tuning job",
        "",
        f"`{doc['command']}` on {doc['machine']['cores']} CPU cores (shared; load average "
        f"{doc['load_average_start'][0]} at start, {doc['load_average_end'][0]} at end), one torch thread per run, "
        f"reconciler poll interval {doc['reconciler_poll_interval_s']} s. LoRA r=8, fp32, same data/plan/seed in every run. "
        "No GPU in this session: CPU only.",
        "",
        "## POST -> first training step (service), by phase (seconds)",
        "",
        "| model | POST answered | POST->launched | launched->process up | up->model ready | ready->first step done | **POST->first step** | bare loop start->first step | SFTTrainer start->first step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        s = {k: v["median"] for k, v in r["service"].items()}
        span = r["service"]["post_to_first_step_s"]
        lines.append(
            f"| {r['size']} | {s['post_answer_s']:.3f} | {s['post_to_launched_s']:.2f} | {s['launched_to_process_up_s']:.2f} | "
            f"{s['process_up_to_model_ready_s']:.2f} | {s['model_ready_to_first_step_s']:.2f} | "
            f"**{s['post_to_first_step_s']:.2f}** ({span['min']:.1f}-{span['max']:.1f}) | "
            f"{r['bare_loop']['start_to_first_step_s']['median']:.2f} | "
            f"{r['sft_trainer_by_hand']['start_to_first_step_s']['median']:.2f} |"
        )
    lines += [
        "",
        "## Training throughput (steady state: median over steps after the first)",
        "",
        "| model | service job tok/s | entry point by hand tok/s | bare loop tok/s | SFTTrainer tok/s | service / by hand | service / bare loop | service / SFTTrainer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        a, b = r["throughput_service_vs_entry_point"], r["throughput_service_vs_bare_loop"]
        c = r["throughput_service_vs_sft_trainer"]
        lines.append(
            f"| {r['size']} (seq {r['seq_len']}, batch {r['batch']}, {r['steps']} steps) | "
            f"{r['service']['steady_tokens_per_s']['median']:.0f} | {r['entry_point_by_hand']['steady_tokens_per_s']['median']:.0f} | "
            f"{r['bare_loop']['steady_tokens_per_s']['median']:.0f} | "
            f"{r['sft_trainer_by_hand']['steady_tokens_per_s']['median']:.0f} | {a['median']:.2f} ({a['min']:.2f}-{a['max']:.2f}) | "
            f"{b['median']:.2f} ({b['min']:.2f}-{b['max']:.2f}) | {c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f}) |"
        )
    lines += [
        "",
        f"Medians over {doc['rounds']} interleaved rounds (min-max in brackets; ratios per round, then the median).",
        "POST->first step is almost all the training process' own start: the interpreter, `import torch`, "
        "transformers/peft and the model build, which a bare loop and SFTTrainer by hand pay as well (last columns); "
        "ready->first step includes building the job's `Trainer` (its accelerator and data loader) and the first "
        "step under the live-tensor memory meter.",
        "The job trains through transformers' `Trainer` with block-diagonal masks on packed blocks; SFTTrainer by hand "
        "gets the same pre-tokenised blocks and labels without them (plain causal attention across a block's "
        "examples), the bare loop likewise.",
    ]
    if doc["load_average_start"][0] > 0.75 * doc["machine"]["cores"]:
        lines.append(
            f"The machine was shared and loaded while this ran (load average {doc['load_average_start'][0]} on "
            f"{doc['machine']['cores']} cores): one-round ratios between runs that ran minutes apart move by tens "
            "of percent with the load; compare them as rough figures only."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
