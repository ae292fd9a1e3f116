"""One rank of the FSDP-QLoRA test (tests/stack/test_fsdp_qlora.py), started by ``accelerate launch`` with the flags
``advisor.jobs.launchers.train_argv`` gives a real FSDP job.

    python -m accelerate.commands.launch <train_argv's flags> fsdp_qlora_worker.py MODEL_DIR OUT_DIR PLAN_JSON

Each rank builds the plan's QLoRA model with ``advisor.stack.build.build`` (4-bit weights stored in the compute
dtype), wraps it with FSDP through accelerate, as the HF Trainer does for a peft model (peft's wrap policy: every
trainable LoRA leaf its own FSDP unit, the decoder layers theirs; FSDP mixed precision = the 4-bit storage dtype),
creates the optimiser over the wrapped parameters (as the Trainer does) and takes a few optimiser steps. It writes
what the test checks to OUT_DIR/rank<r>.json; rank 0 also saves the gathered adapter to OUT_DIR/adapter
through the job's own save (``advisor.jobs.train.save_trained``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

#: optimiser steps, learning rate and the seed of the batches (the test repeats them in one process)
STEPS, LR, SEED = 3, 1e-3, 1234


def main(model_dir: str, out_dir: str, plan_json: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.distributed.fsdp import update_fsdp_plugin_peft

    from advisor.jobs.train import save_trained
    from advisor.plans import TrainingPlan
    from advisor.stack.build import build, make_optimizer

    torch.set_num_threads(1)
    plan = TrainingPlan.from_dict(json.loads(plan_json))
    out = Path(out_dir)
    # the settings `accelerate launch --use_fsdp ...` put in this process' environment (FSDP_SHARDING_STRATEGY, ...)
    plugin = FullyShardedDataParallelPlugin()
    accelerator = Accelerator(fsdp_plugin=plugin)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate enables FSDP for GPU process groups only (a CPU group gets DDP): this test runs FSDP on gloo,
        # so it sets the distributed type the same launch gives on GPUs; everything after is accelerate's own path
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        # accelerate names the CPU "cpu:0"; FSDP's compute device on a CPU is "cpu" and it refuses a mismatch
        accelerator.state.device = torch.device("cpu")
    rank, world = accelerator.process_index, accelerator.num_processes

    built = build(model_dir, plan, accelerator.device, seed=0, learning_rate=LR, group_replica=True)
    model = built.model
    storage = {type(p).__name__: str(p.dtype) for n, p in model.named_parameters() if "base_layer" in n}
    full_numel = sum(p.numel() for p in model.parameters())
    # what Trainer does for a peft model under FSDP (transformers.distributed.fsdp.update_fsdp_plugin_peft)
    update_fsdp_plugin_peft(model, accelerator)
    model = accelerator.prepare(model)
    assert isinstance(model, FSDP), type(model)
    # the optimiser over the wrapped model's parameters, made after wrapping as the Trainer does (use_orig_params
    # keeps the parameter objects, as shard views; without it FSDP1 would replace them by flat parameters)
    optimizer = accelerator.prepare(
        make_optimizer(plan.optimizer, [p for p in model.parameters() if p.requires_grad], lr=LR)
    )
    local_numel = sum(p.numel() for p in model.parameters())
    losses, grad_norms = [], []
    g = torch.Generator().manual_seed(SEED)  # the same batches on every rank: the loss is the group's
    for _ in range(STEPS):
        ids = torch.randint(0, built.spec.vocab_size, (plan.micro_batch, plan.seq_len), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        grad_norms.append(float(torch.stack([gr.float().norm() for gr in grads]).norm()) if grads else 0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    state = accelerator.get_state_dict(model)  # a collective: every rank
    if accelerator.is_main_process:
        # the job's own save (advisor.jobs.train.save_trained: its output and its checkpoints under FSDP)
        save_trained(accelerator, model, state, out / "adapter", fsdp=True)
    accelerator.wait_for_everyone()
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world": world,
                "losses": losses,
                "grad_norms": grad_norms,
                "full_numel": full_numel,
                "local_numel": local_numel,
                "storage": storage,
                "mixed_precision": str(plugin.mixed_precision_policy),
                "use_orig_params": plugin.use_orig_params,
                "sharding_strategy": str(plugin.sharding_strategy),
            }
        )
    )
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])
