"""Every technique and the README's stacks reproduce their recorded outputs on real images.

``scripts/record_references.py`` recorded them; a change that alters a technique on purpose bumps the
technique's algorithm version and re-records its cases in the same commit. So a change of outputs without a
version bump fails here (the outputs differ), and so does a bump without re-recording (the versions differ):
the version, which is part of the feature cache's namespace, always moves with the outputs.

Quantized and bf16 kernels round differently on each CPU instruction set, so there is one recording per ISA
(``outputs-AVX2.safetensors``, ``outputs-AVX512.safetensors``) and a run compares with its own ISA's.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitedge
from vitedge.api import algorithm_version, config_name
from vitedge.options import parse_options

REFS = Path(__file__).parent / "references"
CASES = json.loads((REFS / "outputs.json").read_text())["cases"]
RECORDINGS = {p.stem.removeprefix("outputs-"): p for p in sorted(REFS.glob("outputs-*.safetensors"))}
LOW_PRECISION = ("bf16", "mixed", "int8", "int4", "int8wo", "int8attn")


def _low_precision(case: dict) -> bool:
    return any(o.split(":")[0] in LOW_PRECISION for o in case["opts"])


@pytest.fixture(scope="module")
def recorded() -> dict[str, torch.Tensor]:
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in RECORDINGS:
        pytest.skip(f"no reference outputs recorded for {isa}: run scripts/record_references.py here")
    return load_file(str(RECORDINGS[isa]))


class _Inputs(dict):
    """The recorded images of each (model id, data set), read on first use with the recording's code."""

    def __init__(self) -> None:
        super().__init__()
        script = Path(__file__).parents[1] / "scripts" / "record_references.py"
        spec = importlib.util.spec_from_file_location("record_references", script)
        assert spec is not None and spec.loader is not None
        self.recorder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.recorder)

    def __missing__(self, key: tuple[str, str]) -> torch.Tensor:
        model_id, data = key
        self[key] = self.recorder.images(vitedge.load(model_id), data)
        return self[key]


@pytest.fixture(scope="module")
def inputs() -> _Inputs:
    return _Inputs()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_recorded_outputs(case, recorded, inputs) -> None:
    enc = vitedge.load(case["model"])
    configs = parse_options(case["opts"])
    now = {config_name(c): algorithm_version(c) for c in configs}
    assert case.get("versions", {}) == now, (
        f"{case['key']} was recorded with algorithm versions {case.get('versions')}, the code has {now}: "
        "re-record with scripts/record_references.py"
    )
    if configs:
        vitedge.optimize_(enc, *configs)
    with torch.inference_mode():
        y = enc(inputs[(case["model"], case["data"])])
    ref = recorded[case["key"]]
    low_precision = any(o.startswith(("bf16", "mixed")) for o in case["opts"])
    tol = 2e-2 if low_precision else 2e-5
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    assert torch.equal(y.argmax(1), ref.argmax(1)), "the predicted classes moved"


def test_recordings_cover_every_case_and_agree_in_fp32() -> None:
    """Each ISA's recording holds every case, and the fp32 cases agree across ISAs (rounding may differ)."""
    assert {"AVX2", "AVX512"} <= set(RECORDINGS)
    files = {isa: load_file(str(path)) for isa, path in RECORDINGS.items()}
    keys = {c["key"] for c in CASES}
    for isa, outputs in files.items():
        assert set(outputs) == keys, f"{isa}'s recording is stale: re-record it"
    first, *others = files.values()
    for case in CASES:
        if not _low_precision(case):
            for outputs in others:
                torch.testing.assert_close(outputs[case["key"]], first[case["key"]], atol=2e-5, rtol=2e-5)
