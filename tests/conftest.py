import os

import pytest
import torch

# Two CI cores: one intra-op thread per test process keeps xdist workers from fighting over them.
torch.set_num_threads(int(os.environ.get("ATTN2CONV_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_error(y, ref) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return ((y - ref).abs().max() / ref.abs().max()).item()


def state_checksum(model: torch.nn.Module) -> float:
    return float(sum(v.double().sum().item() * (i + 1) for i, v in enumerate(model.state_dict().values())
                     if v.is_floating_point()))


@pytest.fixture(autouse=True)
def _cross_check_the_verifier(request, monkeypatch):
    """In the checker's tests every check() runs the decoded-bytes path (attn2conv/check/_wire.py) and the full
    protobuf path and requires the same findings, notes and errors."""
    if request.module.__name__.split(".")[-1].startswith("test_check_"):
        from attn2conv.check import _engine, _wire

        monkeypatch.setattr(_engine, "_CROSS_CHECK", True)
        monkeypatch.setattr(_wire, "STRICT", True)
