"""The training process of one job: ``python -m advisor.jobs.train --job-dir DIR``.

Reads ``DIR/job.json`` (a JobSpec), trains, and writes everything the server needs as files, so the
server can die and come back without losing the job:

    events.jsonl       one JSON line per event (messages, per-step metrics, checkpoints), flushed as written
    checkpoints/       transformers' checkpoint-N/ (adapter or model, tokenizer, optimizer.pt, scheduler.pt,
                       rng_state.pth, scaler.pt under fp16, trainer_state.json written last), the last
                       `keep_checkpoints` kept
    output/            the final adapter (adapter_model.safetensors + adapter_config.json) or model, and tokenizer
    result.json        status (succeeded | failed | cancelled | paused), error {code, message}, what was measured
    measurement.json   the run as a calibration record (advisor.stack.outcomes.TrialResult)

How it trains: transformers' ``Trainer`` runs the steps (data order from its seeded sampler, gradient
accumulation with ``no_sync`` under DDP, FSDP and DDP from ``accelerate launch`` or from a process group
Ray Train set up, mixed precision, clipping, the linear warm-up/decay schedule, checkpoints and their
resumption); callbacks (``_JobCallback``) write our events, metrics, checkpoint events and measurements,
and stop the run on SIGTERM. What the Trainer is given, and why:

- the model from ``advisor.stack.build`` (peft LoRA/DoRA, bitsandbytes QLoRA, activation checkpointing),
  so a job trains exactly what was estimated and calibrated, and the plan's optimiser
  (``make_optimizer``, through ``create_optimizer``: ``optimizers=`` is refused under FSDP);
- the loss of an optimiser step is the sum over its micro-batches' trained tokens divided by the step's
  trained tokens across processes (the Trainer's ``num_items_in_batch`` over shifted labels with
  ``average_tokens_across_devices``; the peft-wrapped causal LM accepts it), not a mean of per-micro-batch
  means (transformers #34191). The logged ``train_loss`` of a step is that token-weighted mean;
- mixed precision where the plan computes in half and the trained parameters are fp32 (adapters on a
  half base, full fine-tuning with fp32 master weights): ``fp16`` (autocast and dynamic loss scaling) or
  ``bf16``. accelerate turns fp16 off on a CPU without a word; there the same autocast and a CPU
  GradScaler are switched on, so an fp16 plan trains under loss scaling wherever it runs. Pure-half full
  fine-tuning trains in its own dtype, without a scaler (none can unscale fp16 gradients);
- batches from ``Collator`` over our own tokenisation (``data.py``: exact per-message label masks):
  packed blocks carry block-diagonal 4D masks and position ids restarting at every example, and no label
  is predicted across an example boundary, so packing is boundary-safe under SDPA and eager attention on
  any device.

Why ``Trainer`` and not TRL's ``SFTTrainer`` here: SFTTrainer's value is dataset preparation (chat
templates, completion-only masks, packing), which we do ourselves with exact per-message label masks;
its padding-free packing is boundary-safe only under flash-attention, whereas our masks work under
SDPA/eager on any device. Underneath, SFTTrainer is this same Trainer. ``bench/job_overhead.py``
compares a job's throughput with SFTTrainer run by hand on the same model and sequences.

Under ``accelerate launch`` (WORLD_SIZE > 1) each process builds a one-device replica and the Trainer's
accelerator wraps it (DDP, or FSDP when launched with the FSDP flags); rank 0 writes events and files.

SIGTERM stops the run at the next micro-step with status ``cancelled`` (the manager tells a cancel request
from an outside SIGTERM); with a ``pause`` file in the job directory the run finishes the step, checkpoints
and ends ``paused``, and a relaunch resumes from the last complete checkpoint (``trainer.train(
resume_from_checkpoint=...)``: weights, optimiser, scheduler, scaler, RNG, step and data position). Under
several processes every rank stops at the same step (the flag is all-reduced).

Memory and step times are measured the way calibration trials measure them (``advisor.jobs.measure``),
so a finished job can join a calibration fit (``calibration.feedback``).

torch and transformers are imported here only (and in ``advisor.jobs.measure``), inside functions: the
job manager imports this module's constants.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: a checkpoint is complete once it exists
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR: checkpoints/checkpoint-<step>
#: keys of the per-step entries the callback adds to the Trainer's log_history (saved in trainer_state.json,
#: so a resumed run gets back its losses and token count from the checkpoint itself)
JOB_LOSS, JOB_TOKENS = "job_train_loss", "job_trained_tokens"
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
        self.device: Any = None
        self.trainer: Any = None  # the Trainer (_trainer_classes), once built
        self.callback: Any = None
        self.pausing = False  # the stop was a pause: the callback asked the Trainer for a checkpoint first
        self.resumed_from: Path | None = None  # the last complete checkpoint, when this run continues one
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
        if self.callback is not None:
            self.callback.close()
        return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED, "paused": EXIT_PAUSED}.get(status, EXIT_FAILED)

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        self.stop_requested = True

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
            import transformers.trainer  # noqa: F401

            import advisor.stack.build  # noqa: F401  (the libraries load before the cap: it is for the model)

            _limit_address_space(int(limit))
        built = self._build(model_dir)

        self.phase = "training"
        self._train(built, train, valid, pad_id, tokenizer)

        self.phase = "output"
        self._save(self.job_dir / OUTPUT)
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

        # one process of the plan's group builds its replica with what the sharding needs (FSDP-QLoRA: 4-bit
        # weights stored in the compute dtype, no fp32 upcast); a single process builds a one-device plan
        group = self.world > 1
        plan = self.spec.plan if group else replace(self.spec.plan, num_gpus=1, sharding="none")
        t = time.perf_counter()
        built = build(
            model_dir,
            plan,
            self.device,
            seed=self.spec.seed,
            learning_rate=self.spec.learning_rate,
            weight_decay=self.spec.weight_decay,
            group_replica=group,
        )
        self.build_s = time.perf_counter() - t
        self.trainable_params = built.trainable_params
        self.lora_modules = list(built.lora_modules)
        built.optimizer = None  # the Trainer makes the plan's optimiser over the (possibly wrapped) model's parameters
        self.events.emit(
            f"Model ready in {self.build_s:.1f} s: {built.trainable_params:,} trainable parameters"
            + (f", LoRA on {', '.join(built.lora_modules)}" if built.lora_modules else ""),
            trainable_params=built.trainable_params,
        )
        return built

    # ---- training: transformers' Trainer and the callback that reports it -------------------------------
    def _train(self, built: Any, train: list[D.Tokens], valid: list[D.Tokens], pad_id: int, tokenizer: Any) -> None:
        import torch
        from transformers import TrainingArguments

        spec, plan = self.spec, built.plan
        amp = mixed_precision(built)
        steps_per_epoch = -(-len(train) // spec.batch_size)
        warmup = int(spec.warmup_ratio * steps_per_epoch * spec.n_epochs)
        args = TrainingArguments(
            output_dir=str(self.job_dir / CHECKPOINTS),
            per_device_train_batch_size=plan.micro_batch,
            gradient_accumulation_steps=plan.grad_accum,
            num_train_epochs=spec.n_epochs,
            learning_rate=spec.learning_rate,
            weight_decay=spec.weight_decay,
            lr_scheduler_type="linear",  # linear warm-up, then linear decay to zero
            warmup_steps=warmup,
            max_grad_norm=spec.max_grad_norm or 0.0,
            fp16=amp == "fp16",
            bf16=amp == "bf16",
            use_cpu=self.device.type == "cpu",
            seed=spec.seed,
            data_seed=spec.seed,
            average_tokens_across_devices=True,
            dataloader_drop_last=False,
            dataloader_num_workers=0,
            remove_unused_columns=False,  # the collator's keys are the model's inputs
            ddp_find_unused_parameters=False,
            save_strategy="no",  # the callback decides when (per epoch, every N steps, on a pause)
            save_total_limit=spec.keep_checkpoints,
            logging_strategy="no",  # the callback logs every step as our events
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        job_trainer, job_callback = _trainer_classes()
        collator = Collator(pad_id, amp_dtype(amp) or _param_dtype(built.model), count_tokens=True)
        self.callback = job_callback(self, valid, collator, steps_per_epoch, amp)
        self.trainer = job_trainer(
            model=built.model,
            args=args,
            train_dataset=train,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[self.callback],
            plan_optimizer=plan.optimizer,
            cpu_fp16=amp == "fp16" and self.device.type == "cpu",
        )
        if plan.sharding == "fsdp" and self.world > 1 and not self.trainer.is_fsdp_enabled:
            # accelerate turns FSDP on for GPU process groups only: never record a DDP run as the FSDP plan
            raise Failure(
                "launcher",
                f"the plan shards with FSDP but accelerate set up {self.world} {self.device.type} "
                "processes without it (FSDP needs GPUs). To fix: sharding ddp",
            )
        cuda = self.device.type == "cuda"
        # single-threaded CPU: process CPU time per step (neighbours cannot stretch it), as in the trials
        cpu_clock = not cuda and self.world == 1 and torch.get_num_threads() == 1
        self.meter.step_time_meter = "process_cpu_time" if cpu_clock else ("cuda_synchronized_wall" if cuda else "wall")
        self.resumed_from = latest_checkpoint(self.job_dir / CHECKPOINTS)
        self.trainer.train(resume_from_checkpoint=str(self.resumed_from) if self.resumed_from is not None else None)
        if self.pausing:
            raise Paused()

    def _valid_loss(self, valid: list[D.Tokens], collator: Any) -> float | None:
        """Token-weighted validation loss over the first MAX_VALID_BLOCKS sequences, with the training masks.
        Every rank runs the same forwards on the wrapped model (a DDP/FSDP forward is a collective)."""
        if not valid:
            return None
        import torch

        model = self.trainer.model_wrapped
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for s in valid[:MAX_VALID_BLOCKS]:
                batch = {k: v.to(self.trainer.args.device) for k, v in collator([s]).items()}
                labels = batch.pop("labels")
                batch.pop(D.NUM_TOKENS, None)
                with self.trainer.autocast_smart_context_manager():
                    logits = model(**batch).logits
                total += float(token_loss_sum(logits, labels))
                n += s.loss_tokens
        model.train()
        return total / max(1, n)

    def _save(self, path: Path) -> None:
        """Adapter (LoRA/QLoRA) or model (full) as safetensors, plus the tokenizer: what the service serves,
        without the Trainer's training_args.bin. Every rank calls it (a collective under FSDP)."""
        trainer = self.trainer
        state = trainer.accelerator.get_state_dict(trainer.model) if self.world > 1 else None
        if self.main:
            save_trained(trainer.accelerator, trainer.model, state, path, fsdp=trainer.is_fsdp_enabled)
            trainer.processing_class.save_pretrained(str(path))

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


@functools.cache
def _trainer_classes() -> tuple[type, type]:
    """(the job's Trainer, its callback): defined on first use, so importing this module loads no torch."""
    import torch
    from transformers import Trainer, TrainerCallback

    from advisor.stack.build import make_optimizer

    class JobTrainer(Trainer):
        """transformers' Trainer with the plan's optimiser, an fp16 loss scaler on the CPU too, and the
        step's summed loss and token count kept for the callback."""

        def __init__(self, *args: Any, plan_optimizer: str, cpu_fp16: bool, **kwargs: Any):
            self.plan_optimizer = plan_optimizer
            self.cpu_fp16 = cpu_fp16
            self.step_loss: Any = None  # this rank's share of the step's token-weighted mean loss
            self.step_tokens = 0  # tokens (padding excluded) this rank ran through the model in the step
            super().__init__(*args, **kwargs)

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if self.cpu_fp16:  # accelerate leaves fp16 off on a CPU: the same autocast and loss scaling as on CUDA
                self.accelerator.native_amp = True
                self.accelerator.scaler = torch.amp.GradScaler("cpu")

        def create_optimizer(self, model: Any = None) -> Any:
            if self.optimizer is None:
                params = [p for p in (model or self.model).parameters() if p.requires_grad]
                self.optimizer = make_optimizer(
                    self.plan_optimizer, params, self.args.learning_rate, self.args.weight_decay
                )
            return self.optimizer

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            """A checkpoint's weights: under FSDP an adapter is written from the gathered state dict by
            ``save_trained`` (peft's own save writes an empty adapter from it); the rest as the Trainer does."""
            if self.is_fsdp_enabled and state_dict is not None and _is_peft(self.accelerator.unwrap_model(self.model)):
                if self.args.should_save:
                    out = Path(output_dir or self.args.output_dir)
                    save_trained(self.accelerator, self.model, state_dict, out, fsdp=True)
                    if self.processing_class is not None:
                        self.processing_class.save_pretrained(str(out))
                return
            super()._save(output_dir, state_dict)

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            self.step_tokens += int(inputs.pop(D.NUM_TOKENS))  # before the model sees the batch
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_loss = loss if self.step_loss is None else self.step_loss + loss
            return loss

    class JobCallback(TrainerCallback):
        """Writes the run's events, metrics and checkpoint events, meters its steps, and stops it."""

        def __init__(self, run: Run, valid: list[D.Tokens], collator: Any, steps_per_epoch: int, amp: str | None):
            self.run = run
            self.valid = valid
            self.collator = collator
            self.steps_per_epoch = steps_per_epoch
            self.amp = amp
            self.start = 0
            self.live: Any = None  # the live-tensor meter (CPU, one process) while it is needed
            self.live_on = False  # entered for the step in progress
            self.t = self.c = 0.0
            self.lr: float | None = None
            self.known: list[str] = []  # checkpoint directories seen, oldest first

        # -- the run's start
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            run, spec, trainer = self.run, self.run.spec, self.run.trainer
            run.total_steps = state.max_steps
            self.start = run.step = state.global_step
            self.known = [str(p) for p in _checkpoints(Path(args.output_dir))]
            if self.start:  # resumed: losses and token count back from the checkpoint's log history
                done = [h for h in state.log_history if JOB_LOSS in h and h["step"] <= self.start]
                run.losses = [float(h[JOB_LOSS]) for h in done]
                run.trained_tokens = int(done[-1][JOB_TOKENS]) if done else 0
                run.events.emit(
                    f"Resumed from the checkpoint at step {self.start}",
                    step=self.start,
                    path=str(run.resumed_from),
                )
            scaled = trainer.accelerator.scaler is not None
            run.events.emit(
                f"Training: {spec.n_epochs} epochs x {self.steps_per_epoch} steps, batch {spec.batch_size} "
                f"({args.per_device_train_batch_size} per micro-step x {args.gradient_accumulation_steps} "
                f"accumulated x {run.world} processes)"
                + (" under fp16 loss scaling" if scaled else (f" under {self.amp} autocast" if self.amp else "")),
                total_steps=run.total_steps,
            )
            self.live = run.meter.live_meter(trainer.model)

        # -- one optimiser step
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            trainer = self.run.trainer
            trainer.step_loss, trainer.step_tokens = None, 0
            if self.live is not None and state.global_step - self.start < 2:  # the first step, then the measured one
                self.live.__enter__()
                self.live_on = True
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_substep_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            run = self.run
            if run.stop_requested and run.world == 1 and not run._pause_requested():
                raise Cancelled()  # a pause finishes the step, then checkpoints

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.lr = float(self.run.trainer.lr_scheduler.get_last_lr()[0])  # the rate this step used

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            run, trainer = self.run, self.run.trainer
            device = args.device
            loss = trainer.step_loss if trainer.step_loss is not None else torch.zeros((), device=device)
            flags = torch.stack(
                [
                    loss.detach().float().reshape(()),
                    torch.tensor(float(trainer.step_tokens), device=device),
                    torch.tensor(1.0 if run.stop_requested else 0.0, device=device),
                    torch.tensor(1.0 if run.stop_requested and run._pause_requested() else 0.0, device=device),
                ]
            )
            if run.world > 1:  # every rank's share of the loss and tokens; every rank stops (or pauses) alike
                torch.distributed.all_reduce(flags)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt, cpu_dt = time.perf_counter() - self.t, time.process_time() - self.c
            metered = self.live_on
            self.close()
            # average_tokens_across_devices: each rank's loss is its token sum / all tokens x world
            value, tokens, stop, pause = float(flags[0]) / run.world, int(flags[1]), bool(flags[2]), bool(flags[3])
            if not math.isfinite(value):
                raise Failure("training", f"the loss is {value} at step {state.global_step}: training diverged")
            cpu_clock = run.meter.step_time_meter == "process_cpu_time"
            run.meter.record_step(state.global_step - 1 - self.start, cpu_dt if cpu_clock else dt, dt, metered)
            run.step = state.global_step
            run.losses.append(value)
            run.trained_tokens += tokens
            self.live = run.meter.after_step(run.step - self.start, trainer.optimizer, self.live)
            state.log_history.append({"step": run.step, JOB_LOSS: value, JOB_TOKENS: run.trained_tokens})
            scaler = trainer.accelerator.scaler
            run.events.emit(
                f"Step {run.step}/{run.total_steps}: training loss={value:.4f}",
                "metrics",
                step=run.step,
                total_steps=run.total_steps,
                epoch=-(-run.step // self.steps_per_epoch),
                train_loss=value,
                learning_rate=self.lr,
                tokens_per_s=tokens / dt if dt > 0 else None,
                step_time_s=dt,
                peak_memory_gib=run.meter.peak_bytes() / 2**30,
                trained_tokens=run.trained_tokens,
                elapsed_s=time.time() - run.t0,
                loss_scale=scaler.get_scale() if scaler is not None else None,
            )
            last = run.step >= run.total_steps
            if stop and not pause:
                raise Cancelled()
            if stop and not last:  # a pause at the last step just finishes the run
                run.pausing = control.should_training_stop = control.should_save = True  # checkpoint, then stop
            every = run.spec.checkpoint_every_steps
            if last or (every and run.step % every == 0) or (not every and run.step % self.steps_per_epoch == 0):
                control.should_save = True

        # -- a checkpoint the Trainer wrote (and rotated)
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            run = self.run
            path = str(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}")
            valid_loss = run._valid_loss(self.valid, self.collator)  # every rank: the forwards are collectives
            now = {str(p) for p in _checkpoints(Path(args.output_dir))}
            removed = [p for p in self.known if p not in now]
            self.known = [p for p in self.known if p in now and p != path] + [path]
            metrics: dict[str, Any] = {
                "step": run.step,
                "epoch": -(-run.step // self.steps_per_epoch),
                "train_loss": run.losses[-1] if run.losses else None,
            }
            if valid_loss is not None:
                metrics["full_valid_loss"] = valid_loss
            run.events.emit(
                f"Checkpoint at step {run.step}"
                + (f": validation loss={valid_loss:.4f}" if valid_loss is not None else ""),
                "checkpoint",
                step=run.step,
                path=path,
                metrics=metrics,
                removed=removed,
            )

        def close(self) -> None:
            """Leave the live-tensor meter if a step left it entered (a stop or a failure mid-step)."""
            if self.live_on:
                self.live_on = False
                self.live.__exit__(None, None, None)

    return JobTrainer, JobCallback


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def save_trained(accelerator: Any, model: Any, state: dict[str, Any] | None, path: Path, *, fsdp: bool) -> None:
    """The trained weights at `path` (rank 0; `state` is the full state dict every rank gathered first, None for
    one process): an adapter (LoRA/QLoRA/DoRA) or the whole model, as safetensors.

    Under FSDP an adapter is cut from the gathered state by ``advisor.stack.build.save_sharded_adapter``: peft's
    ``save_pretrained(state_dict=...)`` picks entries by module name and strips only a leading
    ``_fsdp_wrapped_module.``, so inside nested units (every decoder layer) nothing matches and it writes an
    empty adapter."""
    unwrapped = accelerator.unwrap_model(model)
    if fsdp and state is not None and _is_peft(unwrapped):
        from advisor.stack.build import save_sharded_adapter

        save_sharded_adapter(unwrapped, state, path)
        return
    unwrapped.save_pretrained(str(path), state_dict=state, safe_serialization=True)


def mixed_precision(built: Any) -> str | None:
    """The Trainer's mixed precision for a plan: ``fp16`` (autocast and dynamic loss scaling: fp16 gradients
    underflow) or ``bf16`` (autocast) where the plan computes in half and every trained parameter is fp32
    (adapters on a half base, LoRA and QLoRA; full fine-tuning with fp32 master weights). None for fp32, and
    for pure-half full fine-tuning (its parameters are the half ones: no scaler can unscale fp16 gradients)."""
    import torch

    if built.plan.dtype not in ("fp16", "bf16"):
        return None
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    if not trainable or any(p.dtype != torch.float32 for p in trainable):
        return None
    return built.plan.dtype


def amp_dtype(amp: str | None) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp or "")


def _param_dtype(model: Any) -> Any:
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Summed next-token cross-entropy over the trained labels (fp32), as transformers' ForCausalLMLoss
    takes it before dividing by ``num_items_in_batch`` (the validation loss, and the tests' hand check)."""
    import torch.nn.functional as F

    # shift the labels, not the logits (as transformers' ForCausalLMLoss does): no copy of the logits
    target = F.pad(labels, (0, 1), value=D.IGNORE)[:, 1:].to(logits.device)
    flat = logits.float().view(-1, logits.size(-1))
    return F.cross_entropy(flat, target.reshape(-1), ignore_index=D.IGNORE, reduction="sum")


def block_causal_mask(segments: Any, dtype: Any) -> Any:
    """[batch, 1, L, L] additive mask from [batch, L] segment ids (a torch tensor): token i sees token j
    only when j <= i and both are in the same example (segment id >= 0; padding is -1 and sees only
    itself, so no row is empty). `dtype` is the model's compute dtype (SDPA wants the query's)."""
    import torch

    same = segments[:, :, None] == segments[:, None, :]
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=segments.device)
    allowed = (same & causal & (segments[:, None, :] >= 0)) | eye
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


@dataclass(frozen=True)
class Collator:
    """transformers' ``data_collator`` for lists of `Tokens`: right-padded ``input_ids`` and ``labels``
    (``data.loss_labels``: no target across a packed boundary), and for a batch holding a packed block of more
    than one example the block-diagonal ``attention_mask`` (4D, additive, in `mask_dtype`) and
    ``position_ids`` restarting at every example. Works with any attention implementation (SDPA, eager),
    unlike padding-free packing, which is boundary-safe under flash-attention only.
    `mask_dtype` is a torch dtype (None: float32). With `count_tokens` the batch also holds
    ``NUM_TOKENS``, its tokens without the padding (the job's Trainer takes it out before the model)."""

    pad_id: int
    mask_dtype: Any = None
    count_tokens: bool = False

    def __call__(self, seqs: Sequence[D.Tokens]) -> dict[str, Any]:
        import torch

        ids, _ = D.pad_batch(seqs, self.pad_id)
        width = len(ids[0])
        labels = [D.loss_labels(s) + [D.IGNORE] * (width - len(s.labels)) for s in seqs]
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if any(s.segments is not None and len(set(s.segments)) > 1 for s in seqs):  # blocks of one example: causal
            segs, pos = D.pad_segments(seqs)
            batch["attention_mask"] = block_causal_mask(torch.tensor(segs), self.mask_dtype or torch.float32)
            batch["position_ids"] = torch.tensor(pos)
        if self.count_tokens:
            batch[D.NUM_TOKENS] = torch.tensor(sum(len(s.ids) for s in seqs))
        return batch


def _checkpoints(root: Path) -> list[Path]:
    """transformers' checkpoint-<step> directories under `root`, by step."""
    found = []
    for p in root.glob(f"{CHECKPOINT_PREFIX}-*"):
        step = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and step.isdigit():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that was written to the end: the Trainer writes trainer_state.json after the
    weights, optimiser and scheduler, so one without it (or with it cut short: the disk filled mid-save) is
    never resumed from."""
    for path in reversed(_checkpoints(root)):
        try:
            json.loads((path / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


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
