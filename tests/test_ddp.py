"""DDP: pretrain_sal.py under torchrun with 2 CPU processes (gloo) computes the same first step as one process.

Both runs see the same global batch (the sampler permutes with the same seed whatever the process
count, and each pair depends only on (seed, epoch, index)); the loss is a mean over pairs and pixels, so
DDP's average of the two halves' gradients must equal the single process's gradient.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_sal.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_step(tmp_path: Path, name: str, processes: int, flags) -> dict:
    dump = tmp_path / f"{name}.pt"
    args = [str(SCRIPT), "--smoke", "--no-progress", "--save-first-step", str(dump),
            "--out", str(tmp_path / name), *flags]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    else:
        command = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, killed whole on timeout: a worker left behind by torchrun would keep
    # the output pipes open and the wait would never end.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{name} did not finish in 300 s:\n{stdout}\n{stderr}")
    assert process.returncode == 0, f"{name} failed:\n{stdout}\n{stderr}"
    return {"stdout": stdout, **torch.load(dump, weights_only=False)}


@pytest.mark.parametrize("flags", [["--fg-threshold", "none"], ["--fg-threshold", "none", "--window", "3"]],
                         ids=["dense", "window3"])
def test_ddp_matches_single_process(tmp_path, flags):
    single = first_step(tmp_path, "single", 1, flags)
    ddp = first_step(tmp_path, "ddp", 2, flags)
    assert "DDP x 2" in ddp["stdout"] and "DDP" not in single["stdout"]
    torch.testing.assert_close(ddp["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    assert single["loss"][0] > 0
    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 40
    flat = lambda grads: torch.cat([grads[name].flatten() for name in sorted(grads)])
    g_single, g_ddp = flat(single["grads"]), flat(ddp["grads"])
    # The whole gradient agrees to float32 rounding (summation order differs: two halves, then an
    # all-reduce); a wrong reduction (a sum instead of a mean, a missing half) would be off by ~100 %.
    assert (g_ddp - g_single).norm() <= 1e-4 * g_single.norm()
    # So does every tensor, up to rounding on the scale of the largest gradient (some, e.g. conv biases
    # before instance norm, are zero in exact arithmetic and hold only rounding noise).
    atol = 1e-4 * float(g_single.abs().max())
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
