"""`accelerate estimate-memory` as a peer of bench.peers, through accelerate's own functions.

The command (accelerate.commands.estimate) builds the model on the meta device and prints, per dtype,
the largest layer, the total size and "Training using Adam". For a transformers model its
``create_empty_model`` does ``AutoConfig.from_pretrained(hub id)`` then, under ``init_empty_weights()``,
``AutoModel.from_config(config, torch_dtype=torch.float32)`` (AutoModel, not AutoModelForCausalLM:
an untied lm_head is not counted); ``gather_data`` takes ``calculate_maximum_sizes(model)`` and
``estimate_training_usage(total_size, dtype)``, and ``estimate_command`` prints the largest of that
dict's values. ``create_empty_model`` first asks the Hub for the repo (``verify_on_hub``), which this
machine cannot reach, so ``sizes`` repeats its transformers branch on our catalog's config.json
(``advisor.families.hf_config`` -> ``AutoConfig.for_model``); the numbers then come from accelerate's
``calculate_maximum_sizes`` and ``estimate_training_usage`` unchanged.

What it expresses: full fine-tuning with Adam (32-bit states; a paged AdamW counts as AdamW) in
float32 (fp32 plans) or mixed precision (bf16 / fp16 plans: the "float16" row of the table). LoRA,
QLoRA, 8-bit optimisers and FSDP are not expressible (the int8 / int4 rows print "N/A" for training).
It has no input for batch, sequence or checkpointing (its figure is weights, gradients and Adam
states, "for a batch size of 1"). No throughput.
"""

from __future__ import annotations

from functools import cache

import accelerate
from accelerate.commands.estimate import estimate_training_usage
from accelerate.utils import calculate_maximum_sizes

from advisor.families import hf_config
from advisor.specs import ModelSpec
from bench.peers_base import GIB, NotExpressible, PeerCase, optimizer_family, sharded

VERSION = accelerate.__version__
#: plan dtype -> the `mixed_precision` argument of estimate_training_usage (the table row a user reads)
MIXED_PRECISION = {"fp32": "float32", "bf16": "float16", "fp16": "float16"}


@cache
def sizes(model: ModelSpec) -> tuple[int, int]:
    """(total size, largest layer) in bytes of the float32 meta model, as estimate-memory computes them."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**hf_config(model))
    with init_empty_weights():
        meta = AutoModel.from_config(config, dtype=torch.float32)
    total, largest = calculate_maximum_sizes(meta)
    return int(total), int(largest[0])


def memory_gib(case: PeerCase) -> float:
    """ "Training using Adam" for the plan's dtype row, in GiB."""
    p = case.plan
    if p.method != "full":
        raise NotExpressible(f"method {p.method}: estimate-memory models full training with Adam only")
    if optimizer_family(p) != "adam32":
        raise NotExpressible(f"optimiser {p.optimizer}: estimate-memory assumes Adam with 32-bit states")
    if sharded(p):
        raise NotExpressible("FSDP sharding over several GPUs (estimate-memory is per model, not per GPU)")
    total, _ = sizes(case.model)
    usage = estimate_training_usage(total, MIXED_PRECISION[p.dtype])
    return max(usage.values()) / GIB
