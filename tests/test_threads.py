"""The OpenMP defaults that keep two jobs on one machine from stalling each other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.threads import apply_openmp_defaults, openmp_defaults

REPO = Path(__file__).resolve().parents[1]


def test_defaults_passive_unless_user_chose():
    assert openmp_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_defaults({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert openmp_defaults({"GOMP_SPINCOUNT": "100000"}) == {}


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (loaded by the suite already; the point is that it is)

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert apply_openmp_defaults() is False
    assert "OMP_WAIT_POLICY" not in os.environ


def _runtime_policy(env: dict[str, str]) -> str:
    """The wait policy torch's OpenMP runtime started with, after the medvit entry point ran
    (libgomp prints its settings when OMP_DISPLAY_ENV is set)."""
    code = ("import sys; from pipelines import cli; sys.argv = ['medvit', '--help']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "import torch; torch.ones(4).sum()")
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
           "PYTHONPATH": str(REPO), "OMP_DISPLAY_ENV": "true", **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = [ln.split("=", 1)[1].strip(" '") for ln in out.stderr.splitlines() if "OMP_WAIT_POLICY" in ln]
    assert shown, out.stderr
    return shown[0]


@pytest.mark.parametrize("env, policy", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")])
def test_cli_starts_openmp_passive(env, policy):
    assert _runtime_policy(env) == policy

