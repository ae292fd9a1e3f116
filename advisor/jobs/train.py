"""The training process of one job: ``python -m advisor.jobs.train --job-dir DIR``.

Reads ``DIR/job.json`` (a JobSpec), trains, and writes everything the server needs as files, so the
server can die and come back without losing the job:

    events.jsonl       one JSON line per event (messages, per-step metrics, checkpoints), flushed as written
    checkpoints/       step-NNNNNN/ (adapter or model + tokenizer), the last `keep_checkpoints` kept
    output/            the final adapter (adapter_model.safetensors + adapter_config.json) or model, and tokenizer
    result.json        status (succeeded | failed | cancelled), error {code, message}, what was measured
    measurement.json   the run as a calibration record (advisor.stack.outcomes.TrialResult)

Memory and step times are measured the way calibration trials measure them (``advisor.jobs.measure``),
so a finished job can join a calibration fit (``calibration.feedback``).

The model is built by ``advisor.stack.build`` (the code calibration trials measure), so a job trains
exactly what was estimated and calibrated: peft LoRA, bitsandbytes NF4 with double quantisation and
``prepare_model_for_kbit_training`` for QLoRA, activation checkpointing, the plan's optimiser.
Under ``accelerate launch`` (WORLD_SIZE > 1) each process builds a one-device replica and accelerate
wraps it (DDP, or FSDP when launched with the FSDP flags); rank 0 writes events and files.

SIGTERM stops the run at the next micro-step with status ``cancelled``. torch is imported here only
(and in ``advisor.jobs.measure``), inside functions: the job manager imports this module's constants.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from advisor.jobs import data as D
from advisor.jobs.files import read_examples
from advisor.jobs.measure import JobMeter, measurement_record
from advisor.jobs.spec import JobSpec

EVENTS, RESULT, MEASUREMENT, OUTPUT, CHECKPOINTS = (
    "events.jsonl",
    "result.json",
    "measurement.json",
    "output",
    "checkpoints",
)
MAX_VALID_BLOCKS = 32
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3


class Failure(Exception):
    """A failure with the error code the job ends with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Cancelled(Exception):
    pass


class EventLog:
    """Appends events as JSON lines; each line is flushed at once so the server sees it live."""

    def __init__(self, path: Path | None):
        self._f = path.open("a", encoding="utf-8") if path is not None else None

    def emit(self, message: str, type_: str = "message", level: str = "info", **data: Any) -> None:
        if self._f is None:
            return
        doc = {"ts": time.time(), "type": type_, "level": level, "message": message, "data": data or None}
        self._f.write(json.dumps(doc, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def _atomic_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, path)


def _limit_address_space(extra_bytes: int) -> None:
    """Cap this process' address space at its current size plus `extra_bytes` (a CPU job then hits a
    real MemoryError where a bigger model would not fit: how a host-memory budget is enforced)."""
    import resource

    with open("/proc/self/statm") as f:
        now = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (now + extra_bytes, now + extra_bytes))


class Run:
    """One job's training run, top to bottom: source -> data -> model -> steps -> output."""

    def __init__(self, spec: JobSpec, job_dir: Path):
        self.spec = spec
        self.job_dir = job_dir
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = self.rank == 0
        self.events = EventLog(job_dir / EVENTS if self.main else None)
        self.stop_requested = False
        self.phase = "model_load"
        self.accelerator: Any = None
        self.device: Any = None
        self.meter = JobMeter(self.world)  # step times and memory peaks (advisor.jobs.measure)
        self.losses: list[float] = []
        self.trained_tokens = 0
        self.step = 0
        self.total_steps = 0
        self.build_s: float | None = None
        self.trainable_params: int | None = None
        self.lora_modules: list[str] = []
        self.arch: dict[str, Any] = {}
        self.t0 = time.time()

    # ---- entry ------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        status, error = "failed", None
        try:
            self._run()
            status = "succeeded"
        except Cancelled:
            status, error = "cancelled", {"code": "cancelled", "message": "cancelled by request"}
            self.events.emit("Training stopped: the job was cancelled", level="warn")
        except Failure as f:
            error = {"code": f.code, "message": str(f)[:2000]}
        except BaseException as exc:  # every crash becomes a result with a code, never a silent exit
            from advisor.stack.outcomes import OOM, classify

            code = "oom" if classify(exc) == OOM else self.phase
            error = {"code": code, "message": f"{type(exc).__name__}: {str(exc)[:1500]}"}
            traceback.print_exc()
        if error is not None and status == "failed":
            self.events.emit(f"Training failed ({error['code']}): {error['message'][:500]}", level="error")
        if self.main:
            self._write_result(status, error)
        self.events.close()
        return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status, EXIT_FAILED)

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        self.stop_requested = True

    def _check_stop(self) -> None:
        stop = self.stop_requested
        if self.world > 1:  # every rank must leave at the same step, or the others hang in a collective
            import torch

            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            torch.distributed.all_reduce(flag)
            stop = bool(flag.item())
        if stop:
            raise Cancelled()

    # ---- the run ----------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        spec = self.spec
        if threads := os.environ.get("ADVISOR_TRAIN_THREADS"):
            torch.set_num_threads(int(threads))
        self.meter.threads = torch.get_num_threads()
        random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        self.device = self.meter.device = self._device()
        self.events.emit(
            f"Training process started: {spec.plan.method} on {self.world} x {self.device.type}",
            pid=os.getpid(),
            world_size=self.world,
        )

        self.phase = "model_load"
        model_dir = self._model_dir()
        self.arch = json.loads((model_dir / "config.json").read_text())
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

        self.phase = "data"
        train, valid = self._data(tokenizer, pad_id)

        self.phase = "model_load"
        if limit := os.environ.get("ADVISOR_TRAIN_MEMORY_LIMIT_BYTES"):
            import peft  # noqa: F401

            import advisor.stack.build  # noqa: F401  (the libraries load before the cap: it is for the model)

            _limit_address_space(int(limit))
        built = self._build(model_dir)

        self.phase = "training"
        self._train(built, train, valid, pad_id, tokenizer)

        self.phase = "output"
        if self.main:
            self._save(built, tokenizer, self.job_dir / OUTPUT)
        self.events.emit(
            f"Training finished: {self.step} steps, loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}",
            output_dir=str(self.job_dir / OUTPUT),
        )

    def _device(self) -> Any:
        import torch

        if self.spec.device == "cuda":
            if not torch.cuda.is_available():
                raise Failure("launcher", "the job needs a CUDA device but none is visible")
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            torch.cuda.reset_peak_memory_stats()
            return torch.device("cuda", local)
        return torch.device("cpu")

    def _model_dir(self) -> Path:
        src = self.spec.source
        if src.kind == "local":
            return Path(src.ref)
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                src.ref,
                revision=src.revision,
                local_files_only=not self.spec.allow_download,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
            )
        except Exception as exc:
            where = "the Hugging Face Hub" if self.spec.allow_download else "the local Hugging Face cache"
            raise Failure("model_load", f"cannot get {src.ref!r} from {where}: {exc}") from exc
        return Path(path)

    def _data(self, tokenizer: Any, pad_id: int) -> tuple[list[D.Tokens], list[D.Tokens]]:
        spec, seq_len = self.spec, self.spec.plan.seq_len

        def load(path: str) -> list[D.Tokens]:
            rows = list(read_examples(path))
            fmt = "chat" if "messages" in rows[0][1] else "completion"
            seqs = D.encode_all(tokenizer, rows, fmt, spec.chat_format)
            if spec.packing:
                return D.pack(seqs, seq_len)
            kept, cut = D.truncate(seqs, seq_len)
            if cut:
                self.events.emit(f"{cut} examples longer than {seq_len} tokens were truncated", level="warn")
            return kept

        try:
            train = load(spec.training_file)
            valid = load(spec.validation_file) if spec.validation_file else []
        except (D.DataError, ValueError, KeyError, OSError) as exc:
            raise Failure("data", str(exc)) from exc
        if not train:
            raise Failure("data", "no training sequence has a trained token")
        tokens = sum(t.trained_tokens for t in train)
        self.events.emit(
            f"Tokenized training data: {len(train)} sequences of <= {seq_len} tokens, {tokens} trained tokens"
            + (f"; {len(valid)} validation sequences" if valid else ""),
            sequences=len(train),
            trained_tokens_per_epoch=tokens,
        )
        return train, valid

    def _build(self, model_dir: Path) -> Any:
        from advisor.stack.build import build

        plan = replace(self.spec.plan, num_gpus=1, sharding="none")  # one replica per process
        t = time.perf_counter()
        built = build(
            model_dir,
            plan,
            self.device,
            seed=self.spec.seed,
            learning_rate=self.spec.learning_rate,
            weight_decay=self.spec.weight_decay,
        )
        self.build_s = time.perf_counter() - t
        self.trainable_params = built.trainable_params
        self.lora_modules = list(built.lora_modules)
        if self.world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            built.model, built.optimizer = self.accelerator.prepare(built.model, built.optimizer)
        self.events.emit(
            f"Model ready in {self.build_s:.1f} s: {built.trainable_params:,} trainable parameters"
            + (f", LoRA on {', '.join(built.lora_modules)}" if built.lora_modules else ""),
            trainable_params=built.trainable_params,
        )
        return built

    def _unwrapped(self, built: Any) -> Any:
        return self.accelerator.unwrap_model(built.model) if self.accelerator is not None else built.model

    # ---- training loop ------------------------------------------------------------------------------
    def _train(self, built: Any, train: list[D.Tokens], valid: list[D.Tokens], pad_id: int, tokenizer: Any) -> None:
        import torch

        spec, plan = self.spec, built.plan
        steps_per_epoch = -(-len(train) // spec.batch_size)
        self.total_steps = steps_per_epoch * spec.n_epochs
        warmup = int(spec.warmup_ratio * self.total_steps)

        def lr_lambda(step: int) -> float:  # linear warm-up, then linear decay to zero
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(built.optimizer, lr_lambda)
        params = [p for p in built.model.parameters() if p.requires_grad]
        per_rank = spec.batch_size // self.world
        self.events.emit(
            f"Training: {spec.n_epochs} epochs x {steps_per_epoch} steps, batch {spec.batch_size} "
            f"({plan.micro_batch} per micro-step x {plan.grad_accum} accumulated x {self.world} processes)",
            total_steps=self.total_steps,
        )
        cuda = self.device.type == "cuda"
        # single-threaded CPU: process CPU time per step (neighbours cannot stretch it), as in the trials
        cpu_clock = not cuda and self.world == 1 and torch.get_num_threads() == 1
        self.meter.step_time_meter = "process_cpu_time" if cpu_clock else ("cuda_synchronized_wall" if cuda else "wall")
        live = self.meter.live_meter(built)
        for epoch in range(spec.n_epochs):
            for batch in D.epoch_batches(len(train), spec.batch_size, spec.seed, epoch):
                mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
                metered = live is not None and self.step < 2  # the first step, then the measured one
                with live if metered else contextlib.nullcontext():
                    t, c = time.perf_counter(), time.process_time()
                    loss = torch.zeros((), device=self.device)
                    tokens = 0
                    for i in range(0, len(mine), plan.micro_batch):
                        micro = [train[j] for j in mine[i : i + plan.micro_batch]]
                        ids, labels = D.pad_batch(micro, pad_id)
                        tokens += sum(len(s.ids) for s in micro)
                        loss += built.forward_backward(
                            torch.tensor(ids, device=self.device), torch.tensor(labels, device=self.device)
                        )
                        if self.stop_requested and self.world == 1:
                            raise Cancelled()
                    if spec.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                    built.optimizer_step()
                    lr = sched.get_last_lr()[0]
                    sched.step()
                    if self.world > 1:
                        torch.distributed.all_reduce(loss)
                        loss /= self.world
                        tokens *= self.world
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - t
                    cpu_dt = time.process_time() - c
                value = float(loss)
                if not math.isfinite(value):
                    raise Failure("training", f"the loss is {value} at step {self.step + 1}: training diverged")
                self.meter.record_step(self.step, cpu_dt if cpu_clock else dt, dt, metered)
                self.step += 1
                self.losses.append(value)
                self.trained_tokens += tokens
                live = self.meter.after_step(self.step, built, live)
                self.events.emit(
                    f"Step {self.step}/{self.total_steps}: training loss={value:.4f}",
                    "metrics",
                    step=self.step,
                    total_steps=self.total_steps,
                    epoch=epoch + 1,
                    train_loss=value,
                    learning_rate=lr,
                    tokens_per_s=tokens / dt if dt > 0 else None,
                    step_time_s=dt,
                    peak_memory_gib=self.meter.peak_bytes() / 2**30,
                    trained_tokens=self.trained_tokens,
                    elapsed_s=time.time() - self.t0,
                )
                self._check_stop()
                every = spec.checkpoint_every_steps
                if every and self.step % every == 0 and self.step != self.total_steps:
                    self._checkpoint(built, tokenizer, valid, pad_id, epoch + 1)
            if not spec.checkpoint_every_steps or epoch + 1 == spec.n_epochs:
                self._checkpoint(built, tokenizer, valid, pad_id, epoch + 1)

    def _valid_loss(self, built: Any, valid: list[D.Tokens], pad_id: int) -> float | None:
        if not valid:
            return None
        import torch

        model = self._unwrapped(built)
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for s in valid[:MAX_VALID_BLOCKS]:
                ids, labels = D.pad_batch([s], pad_id)
                out = model(
                    input_ids=torch.tensor(ids, device=self.device), labels=torch.tensor(labels, device=self.device)
                )
                total += float(out.loss)
                n += 1
        model.train()
        return total / n

    def _checkpoint(self, built: Any, tokenizer: Any, valid: list[D.Tokens], pad_id: int, epoch: int) -> None:
        path = self.job_dir / CHECKPOINTS / f"step-{self.step:06d}"
        self._save(built, tokenizer, path)
        if not self.main:
            return
        valid_loss = self._valid_loss(built, valid, pad_id)
        kept = sorted((self.job_dir / CHECKPOINTS).glob("step-*"))
        removed = kept[: max(0, len(kept) - self.spec.keep_checkpoints)]
        for old in removed:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
        metrics = {"step": self.step, "epoch": epoch, "train_loss": self.losses[-1]}
        if valid_loss is not None:
            metrics["full_valid_loss"] = valid_loss
        self.events.emit(
            f"Checkpoint at step {self.step}"
            + (f": validation loss={valid_loss:.4f}" if valid_loss is not None else ""),
            "checkpoint",
            step=self.step,
            path=str(path),
            metrics=metrics,
            removed=[str(p) for p in removed],
        )

    def _save(self, built: Any, tokenizer: Any, path: Path) -> None:
        """Adapter (LoRA/QLoRA) or model (full) as safetensors, plus the tokenizer."""
        model = self._unwrapped(built)
        if self.accelerator is not None:
            state = self.accelerator.get_state_dict(built.model)  # a collective under FSDP: every rank
            if self.main:
                model.save_pretrained(str(path), state_dict=state, safe_serialization=True)
        elif self.main:
            model.save_pretrained(str(path), safe_serialization=True)
        if self.main:
            tokenizer.save_pretrained(str(path))

    # ---- result files ---------------------------------------------------------------------------------
    def _write_result(self, status: str, error: dict[str, Any] | None) -> None:
        measured = self.meter.measured(
            spec_device=self.spec.device,
            steps=self.step,
            total_steps=self.total_steps,
            losses=self.losses,
            trained_tokens=self.trained_tokens,
            build_s=self.build_s,
            t0=self.t0,
        )
        _atomic_json(
            self.job_dir / RESULT,
            {
                "status": status,
                "error": error,
                "measured": measured,
                "trained_tokens": self.trained_tokens,
                "output_dir": str(self.job_dir / OUTPUT) if status == "succeeded" else None,
                "finished_at": time.time(),
            },
        )
        # a run that trained at least one step is a measurement, whatever its end; so is an OOM
        if self.device is not None and (self.step or (error or {}).get("code") == "oom"):
            record = measurement_record(
                self.meter,
                self.spec,
                status=status,
                error=error,
                measured=measured,
                arch=self.arch,
                build_s=self.build_s,
                trainable_params=self.trainable_params,
                lora_modules=self.lora_modules,
                t0=self.t0,
            )
            _atomic_json(self.job_dir / MEASUREMENT, record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advisor.jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--job-dir", required=True, help="the job's directory, holding job.json")
    args = p.parse_args(argv)
    job_dir = Path(args.job_dir).resolve()
    spec = JobSpec.from_dict(json.loads((job_dir / "job.json").read_text()))
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return Run(spec, job_dir).run()


if __name__ == "__main__":
    sys.exit(main())
