"""Every Python block of the README runs, in order, as written.

The blocks share one namespace (a later block may use what an earlier one defined). The only
stand-ins are the user's own pieces the README names but cannot define: an encoder class
``MyUNetEncoder``, a ``loader`` of slice pairs before the data section builds one, ``epochs``, and a
``scans/`` folder (the bundled sample). Each is small so that the whole README runs in seconds.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_blocks():
    """``(first line number, source)`` of each python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


class MyUNetEncoder(nn.Module):
    """A stand-in encoder: ``(B, 1, H, W) -> (B, out_channels, H / 4, W / 4)``."""

    def __init__(self, out_channels: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, out_channels, 3, stride=2, padding=1))

    def forward(self, x):
        return self.net(x)


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 4


@pytest.fixture
def readme_namespace(tmp_path, monkeypatch):
    pytest.importorskip("nibabel")
    from torch.utils.data import DataLoader

    from salign_kernels.data import SAMPLE_IMAGE, SlicePairDataset

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(SAMPLE_IMAGE, scans / SAMPLE_IMAGE.name)
    monkeypatch.chdir(tmp_path)
    pairs = SlicePairDataset(str(scans), axis=2, size=32, max_offset=3, foreground_threshold=0.05)
    batches = [next(iter(DataLoader(pairs, batch_size=2, shuffle=True)))]
    return {"__name__": "readme", "MyUNetEncoder": MyUNetEncoder, "loader": batches, "epochs": 1}


def test_every_python_block_runs(readme_namespace):
    torch.manual_seed(0)
    for line, source in readme_blocks():
        code = compile(source, f"README.md, block at line {line}", "exec")
        exec(code, readme_namespace)  # noqa: S102  (the README's own code)
