"""Test support shared across test folders (importable thanks to pytest's pythonpath = tests)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch

# One representative of every supported family: (model id, load kwargs).
SUPPORTED: list[tuple[str, dict]] = [
    ("vit4mnist", {}),
    ("timm:deit_tiny_patch16_224", {}),
    ("timm:deit_tiny_distilled_patch16_224", {}),
    ("timm:vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    ("timm:vit_base_patch32_clip_224", {}),
    ("timm:vit_base_patch16_siglip_224", {}),
    ("timm:eva02_tiny_patch14_224", {}),
    ("timm:swin_tiny_patch4_window7_224", {}),
    ("hf:vit", {}),
    ("hf:clip-vision", {}),
    ("hf:siglip-vision", {}),
]
SUPPORTED_IDS = [m for m, _ in SUPPORTED]

_cache: dict[str, torch.nn.Module] = {}


def load_cached(model_id: str):
    """Build a supported model once per session (tests must not modify it: load a fresh one for that)."""
    from vitedge.models import load

    if model_id not in _cache:
        torch.manual_seed(0)
        _cache[model_id] = load(model_id, **dict(SUPPORTED)[model_id])
    return _cache[model_id]


# The ViT-B-sized representatives: every technique still runs on them, but with one setting each, so the
# suite stays within minutes on two cores.
HEAVY_IDS = {
    "timm:vit_base_patch32_clip_224",
    "timm:vit_base_patch16_siglip_224",
    "hf:vit",
    "hf:clip-vision",
    "hf:siglip-vision",
}


def coverage(settings: list[str], heavy_setting: str) -> list[tuple[str, str]]:
    """(model id, setting) pairs: every setting on the small models, ``heavy_setting`` on the heavy ones."""
    return [(m, s) for m in SUPPORTED_IDS for s in settings if m not in HEAVY_IDS or s == heavy_setting]


def assert_stochastic_depth_kept(name: str, option: str) -> None:
    """A project model with drop-path 0.5 under ``-O option`` drops blocks per sample in training, and in eval
    equals the same weights built without drop-path."""
    import torch

    from vitedge.api import optimize_
    from vitedge.models.cifar import build_project_model
    from vitedge.options import parse_options

    torch.manual_seed(0)
    dropping = build_project_model(name, drop_path=0.5)
    plain = build_project_model(name, drop_path=0.0)
    plain.load_state_dict(dropping.state_dict())
    dropping, plain = (optimize_(m, *parse_options([option])) for m in (dropping, plain))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dropping.train()
    torch.manual_seed(0)
    a = dropping(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, dropping(x))  # other blocks dropped for other samples
    dropping.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(dropping(x), plain(x), atol=1e-6)  # eval: drop-path is the identity


class RunBlock:
    """A gate step that always runs its block: vitedge's own block loop with nothing else changed."""

    label = "test:run-block"

    def __call__(self, encoder: Any, state: Any, run_block: Any) -> Any:
        return run_block(state)


@contextlib.contextmanager
def planned(model: Any, *configs: Any, gates: bool = False) -> Iterator[Any]:
    """``model`` (a cached one, say) running with the plan steps of ``configs`` added, for techniques that
    change no weights; ``gates`` puts a :class:`RunBlock` gate on every block, so vitedge's block loop runs
    even where the configs change nothing. Plan and applied list are put back afterwards."""
    from dataclasses import replace

    from vitedge.api import build_plan
    from vitedge.plan import BlockPlan, ExecutionPlan

    saved = list(model.applied), model.plan
    model.applied = [*model.applied, *configs]
    try:
        plan = build_plan(model)
        if gates:
            if plan is None:
                plan = ExecutionPlan(blocks=tuple(BlockPlan(index=i) for i in range(len(model.blocks))))
            plan = replace(plan, blocks=tuple(replace(b, gate=RunBlock()) for b in plan.blocks))
        model.plan = plan
        yield model
    finally:
        model.applied, model.plan = saved


@contextlib.contextmanager
def uvicorn_on_loopback(app):
    """A real uvicorn serving ``app`` on a free 127.0.0.1 port, in a thread, until the block ends."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        raise TimeoutError("the service did not become ready within 60 s")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def process_titles() -> list[tuple[int, str]]:
    """(pid, command line) of every process (Ray titles its workers ``ray::...``)."""
    import os

    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out.append((int(entry), f.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return out


def start_serve(*args: str, stderr: int | None = subprocess.DEVNULL) -> subprocess.Popen:
    """``vitedge serve ARGS --port 0 --json`` in a subprocess, stdout piped (its first line is the ready
    line); ``stderr`` as :class:`subprocess.Popen` takes it (``subprocess.PIPE`` to read errors)."""
    cmd = [
        sys.executable,
        "-c",
        "from vitedge.cli import main; main()",
        "serve",
        *args,
        "--port",
        "0",
        "--json",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
