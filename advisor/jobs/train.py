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

SIGTERM stops the run at the next micro-step with status ``cancelled`` (the manager tells a cancel request
from an outside SIGTERM); with a ``pause`` file in the job directory the run first checkpoints and ends
``paused``, and a relaunch resumes from the last checkpoint (weights, optimiser state, step, schedule).

The loop fixes what a naive loop gets wrong (what transformers' Trainer does): the loss of an optimiser
step is the sum over its micro-batches' trained tokens divided by the step's trained tokens (across
processes), not a mean of per-micro-batch means (transformers #34191); fp16 compute trains under a
GradScaler (dynamic loss scaling); packed sequences carry per-example block-diagonal causal masks and
position ids restarting at every example, so no token attends across an example boundary (SDPA included).

torch is imported here only
(and in ``advisor.jobs.measure``), inside functions: the job manager imports this module's constants.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import random
import signal
import sys
import threading
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
PAUSE = "pause"  # present in the job directory when a SIGTERM means "checkpoint and pause"
TRAINER_STATE, OPTIMIZER_STATE = "trainer_state.json", "optimizer.pt"
#: a test hook: cap the size of any file this process writes (RLIMIT_FSIZE): a full disk, for real
FSIZE_LIMIT_ENV = "ADVISOR_TRAIN_FSIZE_LIMIT_BYTES"
MAX_VALID_BLOCKS = 32
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_PAUSED = 0, 1, 3, 4
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ("no space left", "file too large", "disk quota", "os error 28", "os error 27", "os error 122")


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a full disk or an exceeded file-size limit: safetensors and
    torch.save wrap the OSError in their own exceptions, so the text is read too."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Failure(Exception):
    """A failure with the error code the job ends with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Cancelled(Exception):
    """Stop requested (SIGTERM, or run.stop_requested set by a Ray worker's watcher)."""


class Paused(Exception):
    """Stopped after a checkpoint, to be resumed."""


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
        if threading.current_thread() is threading.main_thread():  # a Ray Train worker runs us in a thread
            signal.signal(signal.SIGTERM, self._on_sigterm)
        status, error = "failed", None
        try:
            self._run()
            status = "succeeded"
        except Paused:
            status = "paused"
            self.events.emit(f"Training paused at step {self.step}: resume continues from its checkpoint")
        except Cancelled:
            # the manager knows whether this SIGTERM was a cancel request or came from outside
            status, error = "cancelled", {"code": "cancelled", "message": "stopped by SIGTERM"}
            self.events.emit("Training stopped by SIGTERM", level="warn")
        except Failure as f:
            error = {"code": f.code, "message": str(f)[:2000]}
        except BaseException as exc:  # every crash becomes a result with a code, never a silent exit
            from advisor.stack.outcomes import OOM, classify

            code = "output" if disk_full(exc) else ("oom" if classify(exc) == OOM else self.phase)
            error = {"code": code, "message": f"{type(exc).__name__}: {str(exc)[:1500]}"}
            traceback.print_exc()
        if error is not None and status == "failed":
            self.events.emit(f"Training failed ({error['code']}): {error['message'][:500]}", level="error")
        if self.main:
            try:
                self._write_result(status, error)
            except OSError as exc:  # a full disk: the manager writes the end state and the measurement
                print(f"cannot write the result: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):
            self.events.close()
        return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED, "paused": EXIT_PAUSED}.get(status, EXIT_FAILED)

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

    def _pause_requested(self) -> bool:
        return (self.job_dir / PAUSE).exists()

    # ---- the run ----------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        spec = self.spec
        if fsize := os.environ.get(FSIZE_LIMIT_ENV):
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the cap fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), int(fsize)))
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
    def _micro_loss_sum(self, built: Any, micro: list[D.Tokens], pad_id: int, model: Any = None) -> tuple[Any, int]:
        """Forward one micro-batch; returns (summed token cross-entropy, trained tokens). Packed blocks get
        their block-diagonal masks and per-example position ids; right-padded ones need no mask."""
        import torch

        ids, labels = D.pad_batch(micro, pad_id)
        kwargs: dict[str, Any] = {"input_ids": torch.tensor(ids, device=self.device)}
        if any(s.segments is not None and len(set(s.segments)) > 1 for s in micro):  # blocks of one example: causal
            segs, pos = D.pad_segments(micro)
            kwargs["attention_mask"] = block_causal_mask(
                torch.tensor(segs, device=self.device), self._mask_dtype(built)
            )
            kwargs["position_ids"] = torch.tensor(pos, device=self.device)
        with built._autocast():
            logits = (model or built.model)(**kwargs).logits
        return token_loss_sum(logits, torch.tensor(labels, device=self.device)), sum(s.loss_tokens for s in micro)

    def _mask_dtype(self, built: Any) -> Any:
        import torch

        if built.autocast_dtype is not None:
            return built.autocast_dtype
        return next((p.dtype for p in built.model.parameters() if p.is_floating_point()), torch.float32)

    def _train(self, built: Any, train: list[D.Tokens], valid: list[D.Tokens], pad_id: int, tokenizer: Any) -> None:
        import torch

        spec, plan = self.spec, built.plan
        steps_per_epoch = -(-len(train) // spec.batch_size)
        self.total_steps = steps_per_epoch * spec.n_epochs
        warmup = int(spec.warmup_ratio * self.total_steps)
        scaler = make_scaler(built)
        start = self._resume(built, scaler)

        def lr_lambda(i: int) -> float:  # linear warm-up, then linear decay to zero (continues after a resume)
            step = i + start
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(built.optimizer, lr_lambda)
        params = [p for p in built.model.parameters() if p.requires_grad]
        per_rank = spec.batch_size // self.world
        self.events.emit(
            f"Training: {spec.n_epochs} epochs x {steps_per_epoch} steps, batch {spec.batch_size} "
            f"({plan.micro_batch} per micro-step x {plan.grad_accum} accumulated x {self.world} processes)"
            + (" under fp16 loss scaling" if scaler is not None else ""),
            total_steps=self.total_steps,
        )
        cuda = self.device.type == "cuda"
        # single-threaded CPU: process CPU time per step (neighbours cannot stretch it), as in the trials
        cpu_clock = not cuda and self.world == 1 and torch.get_num_threads() == 1
        self.meter.step_time_meter = "process_cpu_time" if cpu_clock else ("cuda_synchronized_wall" if cuda else "wall")
        live = self.meter.live_meter(built)
        index = 0
        for epoch in range(spec.n_epochs):
            for batch in D.epoch_batches(len(train), spec.batch_size, spec.seed, epoch):
                index += 1
                if index <= start:  # trained before the checkpoint this run resumed from
                    continue
                mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
                micros = [
                    [train[j] for j in mine[i : i + plan.micro_batch]] for i in range(0, len(mine), plan.micro_batch)
                ]
                metered = live is not None and self.step - start < 2  # the first step, then the measured one
                with live if metered else contextlib.nullcontext():
                    t, c = time.perf_counter(), time.process_time()
                    # the step's loss is over all its trained tokens (every micro-batch, every process)
                    n_items = torch.tensor(float(sum(s.loss_tokens for m in micros for s in m)), device=self.device)
                    if self.world > 1:
                        torch.distributed.all_reduce(n_items)
                    loss = torch.zeros((), device=self.device)
                    tokens = 0
                    for k, micro in enumerate(micros):
                        sync = k == len(micros) - 1 or self.accelerator is None
                        ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(built.model)
                        with ctx:  # DDP all-reduces the gradients once per optimiser step, not per micro-batch
                            total, _ = self._micro_loss_sum(built, micro, pad_id)
                            # DDP averages gradients over processes: scale by world so the sum is over tokens
                            scaled = total * self.world / n_items
                            (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        loss += total.detach() / n_items
                        tokens += sum(len(s.ids) for s in micro)
                        if self.stop_requested and self.world == 1 and not self._pause_requested():
                            raise Cancelled()  # a pause finishes the step, then checkpoints
                    if scaler is not None:
                        scaler.unscale_(built.optimizer)
                    if spec.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                    if scaler is not None:
                        scaler.step(built.optimizer)
                        scaler.update()
                        built.optimizer.zero_grad(set_to_none=True)
                    else:
                        built.optimizer_step()
                    lr = sched.get_last_lr()[0]
                    sched.step()
                    if self.world > 1:
                        torch.distributed.all_reduce(loss)  # each rank's share of the token-weighted mean
                        tokens *= self.world
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - t
                    cpu_dt = time.process_time() - c
                value = float(loss)
                if not math.isfinite(value):
                    raise Failure("training", f"the loss is {value} at step {self.step + 1}: training diverged")
                self.meter.record_step(self.step - start, cpu_dt if cpu_clock else dt, dt, metered)
                self.step += 1
                self.losses.append(value)
                self.trained_tokens += tokens
                live = self.meter.after_step(self.step - start, built, live)
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
                    loss_scale=scaler.get_scale() if scaler is not None else None,
                )
                try:
                    self._check_stop()
                except Cancelled:
                    if self._pause_requested() and self.step != self.total_steps:
                        self._checkpoint(built, tokenizer, valid, pad_id, epoch + 1, scaler)
                        raise Paused() from None
                    raise
                every = spec.checkpoint_every_steps
                if every and self.step % every == 0 and self.step != self.total_steps:
                    self._checkpoint(built, tokenizer, valid, pad_id, epoch + 1, scaler)
            if (not spec.checkpoint_every_steps or epoch + 1 == spec.n_epochs) and index > start:
                self._checkpoint(built, tokenizer, valid, pad_id, epoch + 1, scaler)

    def _resume(self, built: Any, scaler: Any) -> int:
        """Load the last complete checkpoint (weights, optimiser, scaler, counters) if there is one; returns
        the step it was taken at (0 for a fresh run)."""
        last = latest_checkpoint(self.job_dir / CHECKPOINTS)
        if last is None:
            return 0
        import torch

        state = json.loads((last / TRAINER_STATE).read_text())
        model = self._unwrapped(built)
        load_weights(model, last)
        opt = last / OPTIMIZER_STATE
        if opt.is_file():
            saved = torch.load(opt, map_location=self.device, weights_only=True)
            built.optimizer.load_state_dict(saved["optimizer"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state.get("losses", [])]
        self.trained_tokens = int(state.get("trained_tokens", 0))
        self.events.emit(f"Resumed from the checkpoint at step {self.step}", step=self.step, path=str(last))
        return self.step

    def _valid_loss(self, built: Any, valid: list[D.Tokens], pad_id: int) -> float | None:
        if not valid:
            return None
        import torch

        model = self._unwrapped(built)
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():  # token-weighted, with the same per-example masks as training
            for s in valid[:MAX_VALID_BLOCKS]:
                loss_sum, tokens = self._micro_loss_sum(built, [s], pad_id, model=model)
                total += float(loss_sum)
                n += tokens
        model.train()
        return total / max(1, n)

    def _checkpoint(
        self, built: Any, tokenizer: Any, valid: list[D.Tokens], pad_id: int, epoch: int, scaler: Any = None
    ) -> None:
        path = self.job_dir / CHECKPOINTS / f"step-{self.step:06d}"
        self._save(built, tokenizer, path)
        if not self.main:
            return
        import torch

        sharded = self.accelerator is not None and getattr(self.accelerator.state, "fsdp_plugin", None) is not None
        if not sharded:  # FSDP shards the optimiser state: its resume reloads the weights only
            torch.save(
                {"optimizer": built.optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                path / OPTIMIZER_STATE,
            )
        # written last: a checkpoint without it is incomplete (the disk filled mid-save) and never resumed from
        _atomic_json(
            path / TRAINER_STATE,
            {"step": self.step, "epoch": epoch, "losses": self.losses, "trained_tokens": self.trained_tokens},
        )
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


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Summed next-token cross-entropy over the trained labels (fp32): the caller divides by the optimiser
    step's trained tokens, so micro-batches weigh by their tokens (transformers' num_items_in_batch)."""
    import torch.nn.functional as F

    # shift the labels, not the logits (as transformers' ForCausalLMLoss does): no copy of the logits
    target = F.pad(labels, (0, 1), value=D.IGNORE)[:, 1:].to(logits.device)
    flat = logits.float().view(-1, logits.size(-1))
    return F.cross_entropy(flat, target.reshape(-1), ignore_index=D.IGNORE, reduction="sum")


def block_causal_mask(segments: Any, dtype: Any) -> Any:
    """[batch, 1, L, L] additive mask: token i sees token j only when j <= i and both are in the same
    example (segment id >= 0; padding is -1 and sees only itself, so no row is empty)."""
    import torch

    same = segments[:, :, None] == segments[:, None, :]
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=segments.device)
    allowed = (same & causal & (segments[:, None, :] >= 0)) | eye
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def make_scaler(built: Any) -> Any:
    """fp16 compute needs dynamic loss scaling (fp16 gradients underflow); bf16/fp32 do not. Only where
    the trainable parameters are fp32 (the scaler cannot unscale fp16 gradients): adapters on an fp16
    base (LoRA, QLoRA) and full fine-tuning with fp32 master weights."""
    import torch

    if built.plan.dtype != "fp16":
        return None
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    if not trainable or any(p.dtype != torch.float32 for p in trainable):
        return None
    return torch.amp.GradScaler(built.device.type)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that was written to the end (its trainer_state.json exists)."""
    done = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def load_weights(model: Any, path: Path) -> None:
    """A checkpoint's adapter (peft) or full weights into `model`."""
    from safetensors.torch import load_file

    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise Failure("training", f"checkpoint {path} holds no weights")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if unexpected or set(missing) - tied:
        raise Failure("training", f"checkpoint {path} does not match the model: missing {missing[:5]}")


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
