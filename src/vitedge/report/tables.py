"""Rich tables for the CLI. They take the same dicts that ``--json`` prints, so both views agree."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _g(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def print_profile(r: dict[str, Any], console: Console, *, max_layers: int = 40) -> None:
    t = Table(title=f"{r['model']} ({r['name']}) batch {r['batch']}, {r['dtype']}, {r['img_size']}")
    for col in ("layer", "MACs", "params", "bytes", "FLOP/byte"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    layers = r["layers"]
    shown = layers if len(layers) <= max_layers else layers[: max_layers // 2] + layers[-max_layers // 2 :]
    for i, layer in enumerate(shown):
        if len(layers) > max_layers and i == max_layers // 2:
            t.add_row(f"... {len(layers) - max_layers} more", "", "", "", "")
        t.add_row(
            layer["name"],
            _g(layer["macs"]),
            _g(layer["params"]),
            _bytes(layer["bytes"]),
            f"{layer['intensity']:.1f}",
        )
    console.print(t)
    console.print(f"MACs {_g(r['macs'])}  FLOPs {_g(r['flops'])}  params {_g(r['params'])}")
    if "counted_flops" in r:
        ratio = r["counted_over_analytic"]
        console.print(f"counted FLOPs {_g(r['counted_flops'])}  (counted / analytic = {ratio:.4f})")
    console.print(f"weights {_bytes(r['weight_bytes'])}  peak activations {_bytes(r['activation_bytes'])}")
    if "max_batch" in r:
        console.print(f"max batch within {_bytes(r['budget_bytes'])}: {r['max_batch']}")
    if "measured_memory" in r:
        console.print(f"measured: {r['measured_memory']}")


def print_eval(r: dict[str, Any], console: Console) -> None:
    t = Table(title=f"{r['model']} on {r['data']} ({r['n']} images)")
    for col in ("variant", "top-1", "top-5", "cosine", "top-1 agreement"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    if "baseline_top1" in r:
        t.add_row("baseline", f"{r['baseline_top1']:.4f}", f"{r['baseline_top5']:.4f}", "", "")
    cos = r.get("mean_cosine")
    agree = r.get("top1_agreement")
    t.add_row(
        r["name"],
        f"{r['top1']:.4f}",
        f"{r['top5']:.4f}",
        "" if cos is None else f"{cos:.5f}",
        "" if agree is None else f"{agree:.4f}",
    )
    console.print(t)
    if not r.get("trained", True):
        console.print("[yellow]random weights: accuracy is meaningless; read cosine and agreement[/]")


def print_bench(r: dict[str, Any], console: Console) -> None:
    b = r["baseline"]
    t = Table(title=f"{r['model']}: batch {b['batch']}, {b['threads']} threads (interleaved)")
    for col in ("variant", "p50 ms", "p95 ms", "images/s", "speed-up", "95 % interval"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for row in [b, *r["variants"]]:
        sp = row.get("speedup")
        t.add_row(
            row["name"],
            f"{row['p50_ms']:.2f}",
            f"{row['p95_ms']:.2f}",
            f"{row['images_per_s']:.1f}",
            "1.00x" if sp is None else f"{sp:.2f}x",
            _interval(row),
        )
    console.print(t)
    console.print(_stopped([b, *r["variants"]]) + (f"; on {r['data']} images" if r.get("data") else ""))


def _interval(row: dict[str, Any]) -> str:
    if row.get("speedup_low") is None:
        return ""
    return f"{row['speedup_low']:.2f}-{row['speedup_high']:.2f}x"


def _stopped(rows: list[dict[str, Any]]) -> str:
    """Why timing stopped, in words (the interval target met, or a cap hit first)."""
    reasons = sorted({row.get("stop", "") for row in rows} - {""})
    iters = max(row.get("iterations", 0) for row in rows)
    if reasons == ["precision"]:
        return f"timing stopped after {iters} rounds: every interval within the precision target"
    caps = " / ".join(reasons) or "cap"
    return f"timing stopped after {iters} rounds at the {caps}: intervals may be wider than the target"


def print_sweep(r: dict[str, Any], console: Console) -> None:
    b = r["baseline"]
    t = Table(title=f"{r['model']} sweep: batch {r['batch']}, {r['threads']} threads")
    for col in ("setting", "MACs", "images/s", "baseline images/s", "speed-up", "95 % interval", "top-1"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    t.add_row(
        "baseline",
        _g(b["macs"]),
        f"{b['images_per_s']:.1f}",
        "",
        "1.00x",
        "",
        f"{b['top1']:.4f}" if "top1" in b else "",
    )
    for row in r["rows"]:
        t.add_row(
            row["name"],
            _g(row["macs"]),
            f"{row['images_per_s']:.1f}",
            f"{row['baseline_images_per_s']:.1f}",
            f"{row['speedup']:.2f}x",
            _interval(row),
            f"{row['top1']:.4f}" if "top1" in row else "",
        )
    console.print(t)
    console.print(_stopped(r["rows"]) + " (each row timed against its own interleaved baseline)")
    if "plot" in r:
        console.print(f"plot: {r['plot']}")


def summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per (model, variant): accuracy and speed measured side by side (``make demo``)."""
    t = Table(title=title)
    for col in ("model", "variant", "data", "top-1", "base top-1", "GMACs", "images/s", "speed-up", "batch"):
        t.add_column(col, justify="left" if col in ("model", "variant", "data") else "right")
    for row in rows:
        t.add_row(
            row["model"],
            row["variant"],
            row.get("data", ""),
            f"{row['top1']:.4f}" if row.get("top1") is not None else "",
            f"{row['baseline_top1']:.4f}" if row.get("baseline_top1") is not None else "",
            f"{row['macs'] / 1e9:.3f}",
            f"{row['images_per_s']:.1f}",
            f"{row['speedup']:.2f}x" if row.get("speedup") else "1.00x",
            str(row["batch"]),
        )
    return t


def print_plan(r: dict[str, Any], console: Console) -> None:
    """The execution plan of ``vitedge optimize --explain``: one row per block, then whole-model steps.
    The gate and exit columns show only when some block fills them."""
    blocks = r["blocks"]
    slots = [s for s in ("gate", "exit") if any(b[s] for b in blocks)]
    t = Table(title=f"{r['model']} ({r['name']}): execution plan, per image")
    numeric = ("block", "stage", "tokens in", "tokens out", "MACs")
    for col in ("block", "stage", "tokens in", "tokens out", "kernel", "reducer", *slots, "MACs"):
        t.add_column(col, justify="right" if col in numeric else "left", no_wrap=True)
    for b in blocks:
        cells = [str(b["block"]), str(b["stage"]), str(b["tokens_in"]), str(b["tokens_out"]), b["kernel"]]
        cells += [b["reducer"] or "", *(b[s] or "" for s in slots), _g(b["macs"])]
        t.add_row(*cells)
    console.print(t)
    s = r["steps"]
    console.print(
        f"compute {s['compute_dtype']}  autocast {s['autocast'] or '-'}  router {s['router'] or '-'}  "
        f"compiled {s['compiled'] or '-'}  weights changed by {', '.join(s['weights']) or '-'}"
    )
    console.print(f"MACs {_g(r['macs'])}  FLOPs {_g(r['flops'])}  params {_g(r['params'])}")
