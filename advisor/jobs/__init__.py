"""Fine-tuning jobs: launch a chosen plan as a real training run and follow it to the end.

The pieces, from the HTTP boundary inwards::

    files.py      JSONL upload validation (chat or prompt/completion), atomic writes
    spec.py       JobSpec: everything a training process needs, validated, no shell strings
    service.py    job requests -> model source, plan, estimator check, idempotency -> a stored job
    store.py      SQLAlchemy store (SQLite with WAL by default, any SQLAlchemy URL)
    manager.py    the reconciler thread: validate -> queue -> launch -> follow -> finish, restart recovery
    launchers.py  LocalLauncher (a subprocess per job, GPU slots) and RayLauncher (Ray Jobs API)
    train.py      the training process itself (transformers + peft + bitsandbytes); torch lives there only
    webhooks.py   Standard Webhooks signing and delivery with retries

Nothing here but ``train.py`` and ``data.py``'s callers import torch; the server stays light.
"""
