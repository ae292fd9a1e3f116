"""The live-bytes meter of the trace: every op's outputs counted once per storage, freed by a weakref
finaliser; the peak of live bytes is the allocator's *allocated* peak.

It also takes the CUDA path where the CPU's differs in what is allocated: bitsandbytes' ``gemm_4bit``
dequantises the weight to a temporary and calls ``F.linear`` on CUDA for training-size inputs, and
paged optimiser states live in CUDA unified memory, outside the allocator (``mark_paged``).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: bitsandbytes' CUDA gemm_4bit uses its fused kernel only up to this many rows (M = tokens); above
#: it dequantises the weight to a temporary and calls F.linear (backends/cuda/ops.py, 0.50).
BNB_CUSTOM_GEMM_MAX_ROWS = 4
#: bitsandbytes pages optimiser state buffers of at least this many elements (optim/optimizer.py).
BNB_PAGED_MIN_NUMEL = 100_000


@functools.cache
def _gemm_4bit_op():
    """bitsandbytes' gemm_4bit op (importing bitsandbytes registers it); None without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        return torch.ops.bitsandbytes.gemm_4bit.default
    except (ImportError, AttributeError):  # pragma: no cover - bitsandbytes is part of the train extra
        return None


class LiveBytesMeter(TorchDispatchMode):
    """Counts live storage bytes: each storage once, at the op that created it; freed by a weakref
    finaliser on the storage. Keeps one record per storage lifetime so the composition at the
    peak can be replayed afterwards."""

    def __init__(self, decompose_bnb_gemm: bool = True):
        super().__init__()
        self.gemm_4bit = _gemm_4bit_op()
        self.live = 0
        self.paged = 0
        self.peak = 0
        self.peak_event = 0
        self.peak_phase = ""
        self.event = 0
        self.ops = 0
        self.phase = "load"
        self.phase_peak: dict[str, int] = {}
        self.decompose_bnb_gemm = decompose_bnb_gemm
        self._paused = False
        self._alive: dict[int, int] = {}  # id(storage) -> record
        # records (parallel lists): bytes, alloc event, free event, category, last dim, op
        self.r_bytes: list[int] = []
        self.r_alloc: list[int] = []
        self.r_free: list[int] = []
        self.r_cat: list[str | None] = []
        self.r_last: list[int] = []
        self.r_op: list[str] = []
        self.r_paged: list[bool] = []

    # -- bookkeeping ----------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self):
        """Ops in this block are host-side work that never reaches the device allocator."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peak.setdefault(phase, self.live)
        self.phase_peak[phase] = max(self.phase_peak[phase], self.live)

    def track(self, t, op: str = "", category: str | None = None) -> int | None:
        if not isinstance(t, torch.Tensor):
            return None
        st = t.untyped_storage()
        key = id(st)
        nbytes = st.nbytes()
        rec = self._alive.get(key)
        if rec is not None:
            if self.r_bytes[rec] == nbytes:
                if category is not None:
                    self.r_cat[rec] = category
                return rec
            self._free(key)  # resized in place: the old allocation ends, a new one begins
        rec = len(self.r_bytes)
        self.event += 1
        self.r_bytes.append(nbytes)
        self.r_alloc.append(self.event)
        self.r_free.append(-1)
        self.r_cat.append(category)
        self.r_last.append(int(t.shape[-1]) if t.dim() else 1)
        self.r_op.append(op)
        self.r_paged.append(False)
        self._alive[key] = rec
        self.live += nbytes
        weakref.finalize(st, self._free, key, rec)
        if self.live > self.phase_peak.get(self.phase, 0):
            self.phase_peak[self.phase] = self.live
        if self.live > self.peak:
            self.peak = self.live
            self.peak_event = self.event
            self.peak_phase = self.phase
        return rec

    def _free(self, key: int, rec: int | None = None) -> None:
        cur = self._alive.get(key)
        if cur is None or (rec is not None and cur != rec):
            return
        del self._alive[key]
        self.event += 1
        self.r_free[cur] = self.event
        if self.r_paged[cur]:
            self.paged -= self.r_bytes[cur]
        else:
            self.live -= self.r_bytes[cur]

    def mark_paged(self, t) -> None:
        """A buffer bitsandbytes would place in CUDA unified memory: outside the device count. A new one is
        never live on the device, not even for an instant: the peak stays what it was (before: the peak took
        the buffer in between its creation and this call, one largest-parameter-sized spike at the optimiser
        step of paged plans)."""
        new = id(t.untyped_storage()) not in self._alive if isinstance(t, torch.Tensor) else False
        peak = (self.peak, self.peak_event, self.peak_phase, dict(self.phase_peak))
        rec = self.track(t, "paged", "optimizer_states")
        if new:
            self.peak, self.peak_event, self.peak_phase, self.phase_peak = peak
        if rec is not None and not self.r_paged[rec]:
            self.r_paged[rec] = True
            self.live -= self.r_bytes[rec]
            self.paged += self.r_bytes[rec]

    def categorise(self, tensors, category: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                rec = self._alive.get(id(t.untyped_storage()))
                if rec is not None:
                    self.r_cat[rec] = category

    def composition(self, event: int, vocab: set[int]) -> dict[str, int]:
        """Live bytes by kind at a given event (replayed from the records)."""
        out: dict[str, int] = {}
        for i, nb in enumerate(self.r_bytes):
            a, f = self.r_alloc[i], self.r_free[i]
            if a > event or (f != -1 and f <= event) or self.r_paged[i]:
                continue
            cat = self.r_cat[i]
            if cat is None:
                op = self.r_op[i]
                if op.startswith("bitsandbytes.dequantize") or op == "bnb-gemm-temp":
                    cat = "quant_temporaries"
                elif self.r_last[i] in vocab:
                    cat = "logits"
                else:
                    cat = "activations"
            out[cat] = out.get(cat, 0) + nb
        return out

    def live_at(self, event: int, top: int = 20) -> list[tuple[int, str, str | None, int]]:
        """The largest storages alive at an event: (bytes, op, category, last dim), for reports."""
        rows = [
            (self.r_bytes[i], self.r_op[i], self.r_cat[i], self.r_last[i])
            for i in range(len(self.r_bytes))
            if self.r_alloc[i] <= event and (self.r_free[i] == -1 or self.r_free[i] > event) and not self.r_paged[i]
        ]
        rows.sort(key=lambda r: -r[0])
        return rows[:top]

    # -- dispatch -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if self._paused:
            return func(*args, **kwargs)
        if func is self.gemm_4bit and func is not None and self.decompose_bnb_gemm:
            return self._gemm_4bit_cuda_path(*args, **kwargs)
        out = func(*args, **kwargs)
        name = f"{func.namespace}.{func._opname}"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, name)
        return out

    def _gemm_4bit_cuda_path(
        self,
        A,
        B,
        shapeB,
        absmax,
        blocksize,
        quant_type,
        bias=None,
        absmax_8bit=None,
        absmax_code=None,
        absmax_offset=None,
    ):
        """bitsandbytes' CUDA gemm_4bit for more than a handful of rows: dequantise, then F.linear."""
        rows = A.numel() // A.shape[-1]
        if rows <= BNB_CUSTOM_GEMM_MAX_ROWS:
            out = self.gemm_4bit(
                A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset
            )
            self.track(out, "bitsandbytes.gemm_4bit")
            return out
        if absmax_8bit is not None:
            dq = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax_8bit, absmax, absmax_code, 256, torch.float32
            )
            self.track(dq, "bnb-gemm-temp")
            absmax = dq + absmax_offset
            self.track(absmax, "bnb-gemm-temp")
            del dq
        w = torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type, shapeB, A.dtype)
        self.track(w, "bnb-gemm-temp")
        out = torch.nn.functional.linear(A, w, bias)
        self.track(out, "aten.linear")
        return out
