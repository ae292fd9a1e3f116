"""The caching-allocator term against a replay of the allocator over traced training steps.

    python -m bench.allocator_referee        # writes bench/results/allocator_referee.{json,md}

The simulated trace (advisor/simulated) records every storage a real transformers + peft step allocates
and frees, in order, with its size. ``replay`` runs that sequence through a model of PyTorch's
CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp, defaults: no expandable segments, no
max_split_size): sizes rounded to 512 B; requests of at most 1 MiB from the small pool in 2 MiB segments;
larger ones from the large pool, in 20 MiB segments below 10 MiB and in segments rounded up to 2 MiB
above; best fit (smallest cached block that holds the request, then the lowest address); a block split
when the rest is at least 512 B (small pool) or over 1 MiB (large pool); freed blocks merged with free
neighbours of their segment and kept cached. Reserved = the segments' bytes, allocated = the blocks handed
out. The bench compares reserved - allocated at the reserved peak with the analytical
``allocator_slack`` of the same plan (no constant is fitted to it).
"""

from __future__ import annotations

import bisect
import json
import logging
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from advisor.units import GIB, MIB

OUT = Path(__file__).resolve().parent / "results"
CMD = "python -m bench.allocator_referee"

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 * MIB  # kSmallSize
SMALL_BUFFER = 2 * MIB  # kSmallBuffer
LARGE_BUFFER = 20 * MIB  # kLargeBuffer
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc
ROUND_LARGE = 2 * MIB  # kRoundLarge


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * -(-size // MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


@dataclass
class _Pool:
    free: list[tuple[int, int]] = field(default_factory=list)  # sorted (size, address)


@dataclass
class Allocator:
    """Blocks are (address, size); a segment is a contiguous address range. Addresses are virtual."""

    next_addr: int = 0
    reserved: int = 0
    allocated: int = 0
    peak_reserved: int = 0
    allocated_at_peak: int = 0
    peak_allocated: int = 0
    pools: dict = field(default_factory=lambda: {True: _Pool(), False: _Pool()})
    # address -> (size, segment start, segment end, small pool, free)
    blocks: dict[int, list] = field(default_factory=dict)

    def malloc(self, nbytes: int) -> int:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self.pools[small]
        i = bisect.bisect_left(pool.free, (size, -1))
        if i < len(pool.free):
            bsize, addr = pool.free.pop(i)
            blk = self.blocks[addr]
        else:
            seg = segment_size(size)
            addr = self.next_addr
            self.next_addr += seg
            self.reserved += seg
            blk = [seg, addr, addr + seg, small, True]
            self.blocks[addr] = blk
            bsize = seg
        rest = bsize - size
        if (small and rest >= MIN_BLOCK) or (not small and rest > SMALL_SIZE):
            blk[0] = size
            tail = [rest, blk[1], blk[2], small, True]
            self.blocks[addr + size] = tail
            bisect.insort(pool.free, (rest, addr + size))
        blk[4] = False
        self.allocated += blk[0]
        if self.reserved > self.peak_reserved or (
            self.reserved == self.peak_reserved and self.allocated > self.allocated_at_peak
        ):
            self.peak_reserved, self.allocated_at_peak = self.reserved, self.allocated
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return addr

    def free(self, addr: int) -> None:
        blk = self.blocks[addr]
        self.allocated -= blk[0]
        blk[4] = True
        pool = self.pools[blk[3]]
        # merge with the free neighbours inside the same segment
        nxt = addr + blk[0]
        if nxt < blk[2] and self.blocks[nxt][4]:
            n = self.blocks.pop(nxt)
            pool.free.remove((n[0], nxt))
            blk[0] += n[0]
        prev = self._prev(addr, blk)
        if prev is not None:
            p = self.blocks[prev]
            pool.free.remove((p[0], prev))
            p[0] += blk[0]
            del self.blocks[addr]
            addr, blk = prev, p
        bisect.insort(pool.free, (blk[0], addr))

    def _prev(self, addr: int, blk: list) -> int | None:
        if addr == blk[1]:
            return None
        # the previous block ends at addr: scan back through the segment's blocks (blocks are contiguous)
        a = blk[1]
        while a < addr:
            b = self.blocks[a]
            if a + b[0] == addr:
                return a if b[4] else None
            a += b[0]
        return None


def replay(sizes: list[int], alloc_ev: list[int], free_ev: list[int], skip: list[bool]) -> Allocator:
    """Run the traced allocations and frees (event numbers) through the allocator model."""
    events = []
    for i, (n, a, f) in enumerate(zip(sizes, alloc_ev, free_ev, strict=True)):
        if skip[i] or n == 0:
            continue
        events.append((a, 1, i))
        if f >= 0:
            events.append((f, 0, i))
    events.sort()
    al = Allocator()
    addr: dict[int, int] = {}
    for _, kind, i in events:
        if kind:
            addr[i] = al.malloc(sizes[i])
        elif i in addr:
            al.free(addr.pop(i))
    return al


CASES = [
    # (model, plan fields): hf stack, shapes of the published and recommend designs
    ("qwen2.5-0.5b", dict(method="lora", micro_batch=4, seq_len=1024, grad_checkpointing=False)),
    ("qwen2.5-0.5b", dict(method="full", micro_batch=2, seq_len=1024, grad_checkpointing=True)),
    ("tinyllama-1.1b", dict(method="lora", micro_batch=4, seq_len=512, grad_checkpointing=False)),
    ("tinyllama-1.1b", dict(method="qlora", micro_batch=8, seq_len=512, grad_checkpointing=True)),
    ("tinyllama-1.1b", dict(method="full", micro_batch=4, seq_len=512, grad_checkpointing=False)),
    ("llama-3.2-1b", dict(method="lora", micro_batch=2, seq_len=2048, grad_checkpointing=True)),
    ("phi-2", dict(method="qlora", micro_batch=4, seq_len=512, grad_checkpointing=False)),
    ("llama-2-7b", dict(method="lora", micro_batch=2, seq_len=512, grad_checkpointing=False)),
    ("llama-2-7b", dict(method="qlora", micro_batch=4, seq_len=2048, grad_checkpointing=True)),
    ("mistral-7b", dict(method="lora", micro_batch=1, seq_len=4096, grad_checkpointing=True)),
]
#: the term's structure (which holes it counts) was chosen on CASES; these were replayed only afterwards
HELD_OUT = [
    ("gemma-2b", dict(method="lora", micro_batch=2, seq_len=1024, grad_checkpointing=False)),
    ("qwen2.5-1.5b", dict(method="qlora", micro_batch=4, seq_len=1024, grad_checkpointing=True)),
    ("phi-1.5", dict(method="full", micro_batch=2, seq_len=512, grad_checkpointing=False)),
    ("gpt2-medium", dict(method="lora", micro_batch=8, seq_len=1024, grad_checkpointing=False)),
    ("llama-3.2-3b", dict(method="lora", micro_batch=1, seq_len=8192, grad_checkpointing=True)),
    ("stablelm-base-alpha-3b", dict(method="qlora", micro_batch=2, seq_len=1024, grad_checkpointing=False)),
    ("llama-3-8b", dict(method="lora", micro_batch=2, seq_len=1024, grad_checkpointing=True)),
]


def run_case(name: str, fields: dict) -> dict:
    import advisor.simulated.trace as trace_mod
    from advisor.catalog import default_catalog
    from advisor.estimators.analytical import AnalyticalEstimator
    from advisor.plans import TrainingPlan
    from advisor.simulated.estimator import SimulatedEstimator

    cat = default_catalog()
    model = cat.model(name)
    plan = TrainingPlan(gpu_id="a100-80gb", lora_r=16, lora_targets=("all-linear",), **fields)
    meters = []
    base = trace_mod.LiveBytesMeter

    class Keep(base):  # the trace's own meter, kept for its records
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            meters.append(self)

    trace_mod.LiveBytesMeter = Keep
    try:
        config, targets, _ = SimulatedEstimator()._prepare(model, plan)
        res = trace_mod.trace_step(config, plan, targets)
    finally:
        trace_mod.LiveBytesMeter = base
    m = meters[-1]
    al = replay(m.r_bytes, m.r_alloc, m.r_free, m.r_paged)
    est = AnalyticalEstimator()
    t = est.plan_terms(model, plan)
    replay_slack = al.peak_reserved - al.allocated_at_peak
    return {
        "model": name,
        **{k: v for k, v in fields.items()},
        "traced_peak_gib": round(res.peak_bytes / GIB, 3),
        "replay_allocated_peak_gib": round(al.peak_allocated / GIB, 3),
        "replay_reserved_peak_gib": round(al.peak_reserved / GIB, 3),
        "replay_slack_gib": round(replay_slack / GIB, 3),
        "analytical_slack_gib": round(t.allocator_slack / GIB, 3),
        "share_rule_slack_gib": round(0.15 * (t.allocated - t.static) / GIB, 3),
        "analytical_reserved_error_pct": round(
            100 * ((al.peak_allocated + t.allocator_slack) - al.peak_reserved) / al.peak_reserved, 2
        ),
        "share_rule_reserved_error_pct": round(
            100 * ((al.peak_allocated + 0.15 * (t.allocated - t.static)) - al.peak_reserved) / al.peak_reserved, 2
        ),
    }


def main() -> int:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    if sys.argv[1:] == ["--render"]:  # re-render the md from the committed json (no traces)
        render(json.loads((OUT / "allocator_referee.json").read_text()))
        return 0
    only = sys.argv[1:]
    rows = []
    for group, cases in (("design", CASES), ("held_out", HELD_OUT)):
        for name, fields in cases:
            if only and name not in only:
                continue
            row = {"set": group, **run_case(name, fields)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def stats(key: str, group: str | None = None) -> dict:
        e = sorted(abs(r[key]) for r in rows if group in (None, r["set"]))
        if not e:
            return {"n": 0, "median_abs_pct": None, "worst_abs_pct": None}
        return {"n": len(e), "median_abs_pct": round(statistics.median(e), 2), "worst_abs_pct": round(e[-1], 2)}

    res = {
        "command": CMD,
        "analytical": stats("analytical_reserved_error_pct"),
        "analytical_held_out": stats("analytical_reserved_error_pct", "held_out"),
        "share_rule_0.15": stats("share_rule_reserved_error_pct"),
        "share_rule_0.15_held_out": stats("share_rule_reserved_error_pct", "held_out"),
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "allocator_referee.json").write_text(json.dumps(res, indent=1) + "\n")
    render(res)
    return 0


def render(res: dict) -> None:
    rows = res["rows"]
    lines = [
        "# Caching-allocator slack: analytical term vs a replay of the allocator over traced steps",
        "",
        f"`{CMD}`: reserved peak = the replayed allocated peak + each rule's slack, against the replayed reserved "
        "peak (hf stack, traced with advisor/simulated; allocator model in the bench's docstring).",
        "",
        f"- analytical `allocator_slack` (from tensor sizes): median |error| {res['analytical']['median_abs_pct']}%, "
        f"worst {res['analytical']['worst_abs_pct']}% (held-out cases: {res['analytical_held_out']['median_abs_pct']}%"
        f" / {res['analytical_held_out']['worst_abs_pct']}%)",
        f"- the former rule, 0.15 x (allocated - static): median |error| {res['share_rule_0.15']['median_abs_pct']}%, "
        f"worst {res['share_rule_0.15']['worst_abs_pct']}% (held-out: "
        f"{res['share_rule_0.15_held_out']['median_abs_pct']}% / {res['share_rule_0.15_held_out']['worst_abs_pct']}%)",
        "",
        "Which holes the term counts was chosen on the `design` cases; the `held_out` cases were replayed after. "
        "One rule came from the first held-out replay (qwen2.5-1.5b QLoRA was +15.8%): logits already in fp32 (QLoRA's "
        "upcast head) are not copied by the loss, so they leave no hole. No constant is fitted (one block of cached "
        "temporaries is the structural prior).",
        "",
        "| set | model | method | mb x seq | ckpt | replay allocated GiB | replay reserved GiB | replay slack GiB "
        "| analytical slack GiB | 0.15 rule GiB | analytical % | 0.15 rule % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['model']} | {r['method']} | {r['micro_batch']}x{r['seq_len']} | "
            f"{'on' if r['grad_checkpointing'] else 'off'} | {r['replay_allocated_peak_gib']} | "
            f"{r['replay_reserved_peak_gib']} | {r['replay_slack_gib']} | {r['analytical_slack_gib']} | "
            f"{r['share_rule_slack_gib']} | {r['analytical_reserved_error_pct']:+} | "
            f"{r['share_rule_reserved_error_pct']:+} |"
        )
    (OUT / "allocator_referee.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:7]))


if __name__ == "__main__":
    sys.exit(main())
