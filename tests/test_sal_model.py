"""SALModel (encoder + SALoss in one module), SALoss's warning outside DDP, the engine glue, and
the modules' forward docstrings."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import salign_kernels as sk

ROOT = Path(__file__).resolve().parents[1]


def small_encoder(channels: int = 8, spatial_dims: int = 2) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(1, channels, 3, padding=1), nn.ReLU(), conv(channels, channels, 4, stride=4))


def pair(batch: int = 2, size: int = 16, spatial_dims: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1) + (size,) * spatial_dims
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g), torch.rand(batch, generator=g), \
        torch.rand(batch, generator=g)


# ------------------------------------------------------------------------------------------- SALModel
@pytest.mark.parametrize("channel_first", [True, False], ids=["B1HW", "BHW"])
def test_sal_model_equals_encoder_then_criterion(channel_first):
    torch.manual_seed(0)
    model = sk.SALModel(small_encoder(), sk.SALoss(8, window=3, symmetric=True))
    a, b, pos_a, pos_b = pair()
    mask_a, mask_b = a > 0.3, b > 0.3  # (B, 1, 16, 16), image resolution
    if not channel_first:
        mask_a, mask_b = mask_a[:, 0], mask_b[:, 0]
    out = model(a, b, pos_a, pos_b, mask_a, mask_b)
    feat_a, feat_b = model.encoder(a), model.encoder(b)
    expected = model.criterion(feat_a, feat_b, pos_a, pos_b, sk.feature_mask(mask_a, feat_a),
                               sk.feature_mask(mask_b, feat_b))
    assert isinstance(out, sk.SALossOutput)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    out.total.backward()
    assert all(p.grad is not None for p in model.parameters())  # encoder and head: one optimizer covers both
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("encoder.") for n in names)
    assert any(n.startswith("criterion.head.") for n in names)


def test_sal_model_masks_reach_the_loss():
    """A mask of one foreground corner gives the loss of that corner's cells only."""
    torch.manual_seed(0)
    model = sk.SALModel(small_encoder(), sk.SALoss(8, gp_weight=0.0))
    a, b, pos_a, pos_b = pair()
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[:, :, :4, :4] = True  # one feature cell
    out = model(a, b, pos_a, pos_b, mask, None)
    grid = torch.zeros(2, 4, 4, dtype=torch.bool)
    grid[:, 0, 0] = True
    expected = sk.local_alignment_loss(model.encoder(a), model.encoder(b), mask_a=grid)
    torch.testing.assert_close(out.local, expected, rtol=0, atol=0)
    assert not torch.equal(out.local, model(a, b, pos_a, pos_b).local)


def test_sal_model_3d():
    torch.manual_seed(0)
    model = sk.SALModel(small_encoder(4, spatial_dims=3), sk.SALoss(4, window=3, pos_dims=3))
    a, b, _, _ = pair(size=16, spatial_dims=3)
    out = model(a, b, torch.rand(2, 3), torch.rand(2, 3), a > 0.5, b > 0.5)
    assert out.total.dim() == 0 and torch.isfinite(out.total)


@pytest.mark.parametrize("encoder, criterion, message", [
    (lambda x: x, "loss", "encoder must be an nn.Module; got function"),
    ("conv", sk.LocalAlignmentLoss(), "criterion must be a SALoss; got LocalAlignmentLoss"),
])
def test_sal_model_rejects(encoder, criterion, message):
    encoder = small_encoder() if encoder == "conv" else encoder
    criterion = sk.SALoss(8) if criterion == "loss" else criterion
    with pytest.raises(TypeError, match=message):
        sk.SALModel(encoder, criterion)


def test_sal_model_bad_mask_names_it():
    model = sk.SALModel(small_encoder(), sk.SALoss(8))
    a, b, pos_a, pos_b = pair()
    with pytest.raises(TypeError, match="mask must be a bool tensor; got a torch.float32 tensor"):
        model(a, b, pos_a, pos_b, a, None)


# ------------------------------------------------------------------------------------------- the warning
@pytest.fixture
def two_processes(monkeypatch):
    """Make SALoss see an initialized process group of 2 (no processes needed for its checks)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)  # torch.compile's logging asks for it


def run_loss(criterion, n: int = 1):
    feat = torch.randn(2, 8, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            criterion(feat, feat.flip(-1), torch.rand(2), torch.rand(2))
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_warns_once_outside_ddp(two_processes):
    caught = run_loss(sk.SALoss(8), n=3)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "outside DistributedDataParallel" in message and "DistributedDataParallel(SALModel(" in message
    assert "model.parameters()" in message and "2 processes" in message


def test_no_warning_inside_a_ddp_forward_that_holds_it(two_processes, monkeypatch):
    criterion = sk.SALoss(8)

    class FakeDDP:  # what DistributedDataParallel marks during its forward: itself, holding .module
        module = sk.SALModel(small_encoder(), criterion)

    monkeypatch.setattr(DistributedDataParallel, "_active_ddp_module", FakeDDP())
    assert run_loss(criterion) == []
    FakeDDP.module = small_encoder()  # a DDP forward of a module that does not hold the loss
    assert len(run_loss(criterion)) == 1


def test_no_warning_when_not_distributed_or_evaluating(two_processes, monkeypatch):
    assert run_loss(sk.SALoss(8).eval()) == []  # evaluation: no gradients to average
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert run_loss(sk.SALoss(8)) == []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert run_loss(sk.SALoss(8)) == []


def test_no_warning_without_the_marker(two_processes, monkeypatch):
    """A torch whose DDP does not mark its forward: no reliable way to tell, so no false alarm."""
    monkeypatch.delattr(DistributedDataParallel, "_active_ddp_module")
    assert run_loss(sk.SALoss(8)) == []


def test_torch_marks_the_ddp_forward():
    """The marker the warning relies on: torch's DDP sets it around its forward and restores it."""
    assert DistributedDataParallel._active_ddp_module is None
    source = inspect.getsource(DistributedDataParallel._run_ddp_forward)
    assert "_inside_ddp_forward" in source


# ------------------------------------------------------------------------------------------- real DDP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two gloo processes, each training the three set-ups of ``ddp_sal_worker.py``: ``[rank][mode]``."""
    world, tmp = 2, tmp_path_factory.mktemp("ddp")
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    outs = [tmp / f"rank{rank}.pt" for rank in range(world)]
    # Sessions of their own, killed whole on timeout, so that no worker outlives the test.
    processes = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_sal_worker.py"), str(rank),
                                   str(world), str(port), str(outs[rank])], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                                  start_new_session=True)
                 for rank in range(world)]
    try:
        results = [p.communicate(timeout=120) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the DDP workers did not finish in 120 s")
    for p, (stdout, stderr) in zip(processes, results):
        assert p.returncode == 0, f"a DDP worker failed:\n{stdout}\n{stderr}"
    return [torch.load(out) for out in outs]


def test_ddp_sal_model_keeps_heads_identical(ddp_runs):
    ranks = [r["model"] for r in ddp_runs]
    for name, weight in ranks[0]["after"].items():
        torch.testing.assert_close(ranks[1]["after"][name], weight, rtol=0, atol=0, msg=name)
        assert not torch.equal(weight, ranks[0]["before"][name]), f"{name} did not train"
    assert all(r["warnings"] == [] for r in ranks)


@pytest.mark.parametrize("mode", ["apart", "unregistered"])
def test_ddp_criterion_outside_warns_and_heads_drift(ddp_runs, mode):
    ranks = [r[mode] for r in ddp_runs]
    for r in ranks:
        assert len(r["warnings"]) == 1 and "DistributedDataParallel(SALModel(" in r["warnings"][0]
    # What the warning is about: each rank's head followed its own gradients.
    assert not torch.equal(ranks[0]["after"]["mlp.0.weight"], ranks[1]["after"]["mlp.0.weight"])


# ------------------------------------------------------------------------------------------- engine glue
def test_prepare_batch_feeds_sal_model():
    torch.manual_seed(0)
    model = sk.SALModel(small_encoder(), sk.SALoss(8, window=3))
    a, b, pos_a, pos_b = pair()
    batch = {"slice_a": a, "slice_b": b, "pos_a": pos_a, "pos_b": pos_b, "mask_a": a > 0.3, "mask_b": b > 0.3,
             "volume": ["x", "x"]}
    inputs, target, args, kwargs = sk.SALPrepareBatch()(batch, torch.device("cpu"), False)
    assert target is None and set(kwargs) == {"mask_a", "mask_b"} and kwargs["mask_a"].dtype == torch.bool
    out = model(inputs, *args, **kwargs)
    expected = model(a, b, pos_a, pos_b, a > 0.3, b > 0.3)
    torch.testing.assert_close(sk.sal_total(out, target), expected.total, rtol=0, atol=0)
    _, _, (crop_b, _, _), masks = sk.SALPrepareBatch(image_keys=("crop_a", "crop_b"))(
        {"crop_a": a, "crop_b": b, "pos_a": pos_a, "pos_b": pos_b})
    assert crop_b is b and masks == {}


def test_monai_supervised_trainer_runs_sal():
    """What a bare SALoss cannot do ('SALossOutput' object has no attribute 'mean'): SAL in MONAI's engine."""
    pytest.importorskip("ignite")
    engines = pytest.importorskip("monai.engines")
    torch.manual_seed(0)
    model = sk.SALModel(small_encoder(), sk.SALoss(8, window=3))
    a, b, pos_a, pos_b = pair()
    batch = {"slice_a": a, "slice_b": b, "pos_a": pos_a, "pos_b": pos_b, "mask_a": a > 0.3, "mask_b": b > 0.3}
    expected = model(a, b, pos_a, pos_b, a > 0.3, b > 0.3).total.detach()
    head = model.criterion.head.mlp[0].weight.detach().clone()
    trainer = engines.SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_function=sk.sal_total,
        prepare_batch=sk.SALPrepareBatch(), decollate=False)
    trainer.run()
    output = trainer.state.output
    assert isinstance(output["pred"], sk.SALossOutput) and output["label"] is None
    torch.testing.assert_close(output["loss"].detach(), expected, rtol=0, atol=0)  # the loss before the step
    assert not torch.equal(model.criterion.head.mlp[0].weight, head)  # the head is in the optimizer


@pytest.mark.parametrize("keys, message", [
    ({"image_keys": "slice_a"}, "image_keys must be a pair of str keys; got 'slice_a'"),
    ({"pos_keys": ("pos_a",)}, r"pos_keys must be a pair of str keys; got \('pos_a',\)"),
    ({"mask_keys": ("m", 1)}, r"mask_keys must be a pair of str keys; got \('m', 1\)"),
])
def test_prepare_batch_rejects_keys(keys, message):
    with pytest.raises(TypeError, match=message):
        sk.SALPrepareBatch(**keys)


def test_prepare_batch_rejects_batches():
    prepare = sk.SALPrepareBatch()
    with pytest.raises(TypeError, match="batchdata must be a mapping of a pair batch; got list"):
        prepare([torch.zeros(1)])
    message = r"batchdata lacks the keys \['pos_b'\]; got keys \['pos_a', 'slice_a'"
    with pytest.raises(ValueError, match=message):
        prepare({"slice_a": 0, "slice_b": 0, "pos_a": 0})


def test_sal_total_rejects_a_plain_tensor():
    with pytest.raises(TypeError, match="output must be a SALossOutput .*; got Tensor"):
        sk.sal_total(torch.zeros(2, 8, 4, 4))


# ------------------------------------------------------------------------------------------- docstrings
@pytest.mark.parametrize("module, arguments", [
    (sk.LocalAlignmentLoss, ["feat_a", "feat_b", "mask_a", "mask_b"]),
    (sk.GlobalPositionalHead, ["feat_a", "feat_b"]),
    (sk.SALoss, ["feat_a", "feat_b", "pos_a", "pos_b", "mask_a", "mask_b"]),
    (sk.SALModel, ["image_a", "image_b", "pos_a", "pos_b", "mask_a", "mask_b"]),
])
def test_forward_has_its_own_docstring(module, arguments):
    doc = module.forward.__doc__
    assert doc is not None and doc != nn.Module.forward.__doc__
    assert list(inspect.signature(module.forward).parameters)[1:] == arguments
    for name in arguments:
        assert f"{name}:" in doc, f"{module.__name__}.forward does not document {name}"
    assert "Returns:" in doc and "(B," in doc


def test_the_ddp_check_leaves_a_compiled_step_whole(two_processes):
    """The check runs outside the graph: SALoss still compiles with no graph break, and stays silent."""
    torch._dynamo.reset()
    criterion = sk.SALoss(8, window=3)
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    feat = torch.randn(2, 8, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(feat, feat.flip(-1), torch.rand(2), torch.rand(2))
    assert torch.isfinite(out.total) and not [w for w in caught if issubclass(w.category, RuntimeWarning)]
