"""Quiet logs: repeated library warnings once, missing optional packages not reported as problems."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_an_int8_reply_on_the_cpu_logs_the_cast_warning_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.budgets import Budgets, GiB
    from pipeline.chat import chat
    from pipeline.loading import load_model, unload
    from pipeline.params import GenerationParams
    from pipeline.presets import resolve_model
    from pipeline.quantization import QuantSettings

    loaded = load_model(resolve_model("demo"), Budgets((), GiB, False, tmp_path / "off"), QuantSettings("int8"))
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                chat(loaded, [{"role": "user", "content": "And God said"}],
                     GenerationParams(temperature=0, max_new_tokens=12))
    finally:
        unload(loaded)
    casts = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
    assert len(casts) <= 1, f"{len(casts)} identical warnings"


def test_importing_the_pipeline_and_bitsandbytes_reports_no_failed_import() -> None:
    code = "import pipeline, bitsandbytes, bitsandbytes.backends.cpu.ops, logging; logging.basicConfig()"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "Failed to load" not in result.stderr and "kernels" not in result.stderr
