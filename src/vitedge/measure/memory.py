"""Memory: the largest batch that fits a budget, and the real peak of a forward (tensors and RSS).

The planner adds the analytic weights and peak activations of :func:`vitedge.measure.cost.analyze` to a fixed
runtime overhead. :func:`measure_peak_rss` checks the model behind it: it runs one forward of a real model in
a fresh Python process and reports the resident memory before the model is built, after it is loaded and at
the peak of the forward; :func:`live_tensor_peak` reads the peak of live tensors from the profiler.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from vitedge.measure.cost import analyze, dtype_bytes, live_activations
from vitedge.models.spec import ArchSpec

# Python 3.11 + torch 2.14.1 (the CUDA build, on CPU) + timm imported: ~0.93 GB resident; the first forward
# pages in kernel code for another 30-50 MB. A CPU-only torch build on a device needs less; pass your own.
DEFAULT_RUNTIME_OVERHEAD_BYTES = 1 << 30

# glibc serves allocations above this many bytes with their own mmap and returns them on free. Its default
# threshold grows with freed blocks up to 32 MiB, so freed activations stay in the heap and RSS overstates
# live memory (by ~60 % for DeiT-Ti at batch 64); a fixed threshold makes RSS follow the live tensors.
DEFAULT_MMAP_THRESHOLD = 64 * 1024

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """``"4GiB"``, ``"512MB"``, ``"1.5GB"``, ``"1024"`` or a non-negative int -> bytes.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (units are case-insensitive).

    Raises:
        ValueError: negative, not a number, or an unknown unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a byte count such as 4GiB or 512MB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"byte count must be non-negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a byte count such as 4GiB or 512MB, got {value!r}")
    match = _BYTES_RE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as a byte count; "
            "use a number with B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number):
        raise ValueError(f"byte count {value!r} is not finite")
    return int(number)


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """The largest batch whose weights, runtime overhead and peak activations fit ``budget_bytes``.

    ``max_batch`` is 0 when not even one image fits; ``reason`` then says what does not fit.
    """

    max_batch: int
    budget_bytes: int
    weight_bytes: int
    runtime_overhead_bytes: int
    activation_bytes_per_image: int  # peak activations at batch 1
    activation_bytes: int  # peak activations at max_batch (0 when max_batch is 0)
    total_bytes: int  # weights + overhead + activation_bytes
    dtype: str
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_batch(
    spec: ArchSpec,
    *,
    budget_bytes: int | str,
    dtype: Any = "float32",
    fused_attention: bool = True,
    runtime_overhead_bytes: int | str = DEFAULT_RUNTIME_OVERHEAD_BYTES,
) -> BatchPlan:
    """Largest B with ``weights + runtime_overhead + peak_activations(B) <= budget``.

    Activations follow :func:`vitedge.measure.cost.analyze` and assume an allocator that returns freed blocks
    (see ``DEFAULT_MMAP_THRESHOLD``); with glibc's default settings leave headroom.

    Args:
        spec: the encoder for one image.
        budget_bytes: memory available to the process (an int or a string such as ``"4GiB"``).
        dtype: deployment dtype (as in ``analyze``).
        fused_attention: whether attention scores stay unmaterialised.
        runtime_overhead_bytes: interpreter, torch and libraries (``DEFAULT_RUNTIME_OVERHEAD_BYTES``).

    Raises:
        ValueError: a bad budget, overhead or dtype.
    """
    budget = parse_bytes(budget_bytes)
    overhead = parse_bytes(runtime_overhead_bytes)
    db = dtype_bytes(dtype)
    base = analyze(spec, batch=1, dtype=db.name, fused_attention=fused_attention)
    lives = live_activations(spec, fused_attention=fused_attention, weight_bytes=db.matrix_weight)
    image_elements = spec.in_chans * spec.img_size[0] * spec.img_size[1]
    image_bytes = image_elements * (4 + (db.activation if db.activation != 4 else 0))

    def activations(batch: int) -> int:
        return batch * image_bytes + max((lv.bytes_at(batch, db.activation) for lv in lives), default=0)

    fixed = base.weight_bytes + overhead
    per_image = activations(1)

    def plan(max_batch: int, activation: int, reason: str = "") -> BatchPlan:
        return BatchPlan(
            max_batch=max_batch,
            budget_bytes=budget,
            weight_bytes=base.weight_bytes,
            runtime_overhead_bytes=overhead,
            activation_bytes_per_image=per_image,
            activation_bytes=activation,
            total_bytes=fixed + activation,
            dtype=db.name,
            reason=reason,
        )

    if fixed > budget:
        return plan(
            0,
            0,
            f"weights ({base.weight_bytes} B) and runtime overhead ({overhead} B) "
            f"exceed the budget ({budget} B)",
        )
    if fixed + per_image > budget:
        return plan(
            0,
            0,
            f"one image's activations ({per_image} B) do not fit the {budget - fixed} B left after weights "
            "and runtime overhead",
        )
    lo, hi = 1, 2  # activations(lo) fits; grow hi until it does not, then bisect
    while fixed + activations(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fixed + activations(mid) <= budget else (lo, mid)
    return plan(lo, activations(lo))


@dataclass(frozen=True, kw_only=True)
class MeasuredPeak:
    """Resident memory of one forward pass in a fresh process (bytes).

    ``baseline_bytes``: after importing torch and a warm-up forward of the same model at batch 1 (kernel code
    paged in, thread pool started), the model then deleted; ``loaded_bytes``: after loading the model again;
    ``peak_bytes``: the high-water mark of the forward at ``batch``, counted from after loading
    (``hwm_reset``; when the kernel could not reset it, the mark covers the whole process).
    """

    model_id: str
    batch: int
    dtype: str
    threads: int
    baseline_bytes: int
    loaded_bytes: int
    peak_bytes: int
    param_bytes: int  # parameters and buffers as allocated
    hwm_reset: bool
    mmap_threshold: int | None

    @property
    def model_bytes(self) -> int:
        """Peak RSS minus the RSS before the model was loaded: weights and activations."""
        return self.peak_bytes - self.baseline_bytes

    @property
    def activation_bytes(self) -> int:
        """Peak RSS minus the RSS with the model loaded: what the forward added."""
        return self.peak_bytes - self.loaded_bytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "model_bytes": self.model_bytes, "activation_bytes": self.activation_bytes}


def measure_peak_rss(
    model_id: str,
    *,
    batch: int,
    dtype: Any = "float32",
    img_size: int | None = None,
    threads: int = 2,
    mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD,
    timeout_s: float = 600.0,
) -> MeasuredPeak:
    """Load ``model_id`` with :func:`vitedge.models.load` in a fresh process and measure one forward's RSS.

    Linux only (reads ``/proc/self/status``). Results come back as JSON on the child's stdout.

    Args:
        model_id: any id :func:`vitedge.models.load` accepts.
        batch: images in the forward pass.
        dtype: float32, bfloat16 or float16 (the model is cast after loading).
        img_size: passed to ``load``.
        threads: torch intra-op threads in the child.
        mmap_threshold: glibc ``MALLOC_MMAP_THRESHOLD_`` for the child, so that RSS follows live tensors
            (see ``DEFAULT_MMAP_THRESHOLD``); None keeps glibc's dynamic default.
        timeout_s: give up after this long.

    Raises:
        ValueError: bad batch, threads, threshold or dtype (int8 is a technique; apply it with optimize_).
        RuntimeError: the child failed; the message carries its stderr.
        subprocess.TimeoutExpired: the child ran longer than ``timeout_s``.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if mmap_threshold is not None and (not isinstance(mmap_threshold, int) or mmap_threshold < 0):
        raise ValueError(f"mmap_threshold must be a non-negative int or None, got {mmap_threshold!r}")
    name = dtype_bytes(dtype).name
    if name == "int8":
        raise ValueError(
            "measure_peak_rss takes float32, bfloat16 or float16; int8 is applied with optimize_"
        )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    args = {"model_id": model_id, "batch": batch, "dtype": name, "img_size": img_size, "threads": threads}
    code = "from vitedge.measure.memory import _child_main; _child_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"peak-RSS child for {model_id!r} failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
        )
    out = json.loads(lines[-1])
    return MeasuredPeak(model_id=model_id, dtype=name, threads=threads, mmap_threshold=mmap_threshold, **out)


def live_tensor_peak(model: Any, x: Any) -> int:
    """Peak bytes of CPU tensors allocated and alive at once during ``model(x)`` (under ``no_grad``).

    Read from the profiler's allocation events, so it is exact and independent of the allocator; tensors
    that exist before the call (weights, ``x`` itself) are not included. Runs ``model(x)`` twice: once to warm
    up, once profiled.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# --- the child process -----------------------------------------------------------------------------------


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release() -> None:
    """Collect garbage and hand freed heap pages back to the kernel, so RSS reflects what is alive."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status("VmHWM") <= _proc_status("VmRSS") + (1 << 20)


def _child_main() -> None:
    import torch

    from vitedge.models import Encoder, load

    args = json.loads(sys.argv[1])
    torch.set_num_threads(int(args["threads"]))
    dtype = getattr(torch, args["dtype"])

    def build() -> Encoder:
        model = load(args["model_id"], img_size=args["img_size"]).eval()
        return model if dtype == torch.float32 else model.to(dtype)

    with torch.no_grad():
        warm = build()
        warm(warm.example_input(1))
    del warm
    _release()
    baseline = _proc_status("VmRSS")
    model = build()
    _release()
    loaded = _proc_status("VmRSS")
    param_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    x = model.example_input(int(args["batch"]))
    reset = _reset_hwm()
    with torch.no_grad():
        model(x)
    peak = _proc_status("VmHWM")
    result = {
        "batch": int(args["batch"]),
        "baseline_bytes": baseline,
        "loaded_bytes": loaded,
        "peak_bytes": peak,
        "param_bytes": param_bytes,
        "hwm_reset": reset,
    }
    sys.stdout.write(json.dumps(result) + "\n")
