"""The torch edge: the one place (with calibration/ and advisor/jobs/train.py) that imports torch,
transformers, peft and bitsandbytes at module level.

    build     the one model builder (real device, or meta/fake for the simulated trace), LoRA / DoRA /
              QLoRA wrapping, checkpointing, the plan's optimiser (``make_optimizer``)
    device    torch-side device measurements (matmul rate, copy bandwidth, CUDA properties)
    meters    peak-memory meters (CUDA allocator statistics, live tensor bytes on the CPU)
    outcomes  what a measured run records: status (ok / oom / error), OOM classification, memory
              readings and meter names, the TrialResult record (no torch)
    targets   peft target module names for a plan (no torch)

This package's ``__init__`` imports nothing: ``outcomes`` and ``targets`` stay importable without
the train extra.
"""
