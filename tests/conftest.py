"""pytest configuration: every test starts from the same global seed.

Without a CUDA device, the Triton kernels run on CPU tensors through Triton's interpreter, so that
the conformance tests cover them on any machine. Triton reads ``TRITON_INTERPRET`` when a kernel is
decorated, i.e. when ``salign_kernels.ops.triton`` is first imported: it must be set here, before
any test module imports the package. An explicit ``TRITON_INTERPRET`` in the environment wins.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
