"""fold_reparam + fold_batchnorm on real re-parameterisable timm models: no BN, no parallel branches left."""
import pytest
import timm
import torch

import attn2conv
from attn2conv.graph import is_op
from attn2conv.legality import op_counts

from conftest import rel_error

BN_KINDS = ("aten._native_batch_norm_legit_no_training", "aten.batch_norm")


def _parallel_conv_sums(gm) -> int:
    """add/sub nodes whose two operands are convolutions (possibly behind a BN/mul) over the same input."""

    def source(n):
        # walk back only through what fold_reparam folds: BN (and its getitem) and constant multipliers
        while n.op == "call_function" and n.args and hasattr(n.args[0], "op") and (
                n.target.__name__ == "getitem" or is_op(n, "aten._native_batch_norm_legit_no_training", "aten.mul")):
            n = n.args[0]
        return n.args[0] if is_op(n, "aten.conv2d") else None

    count = 0
    for n in gm.graph.nodes:
        if is_op(n, "aten.add", "aten.sub") and all(hasattr(a, "op") for a in n.args[:2]):
            a, b = (source(x) for x in n.args[:2])
            count += a is not None and a is b
    return count


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m1"])
def test_reparam_models_fold_completely(name):
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():  # random BN statistics, so the folds are not trivially identities
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 64, 64)
    result = attn2conv.convert(model, target="dla", example_inputs=x)
    counts = op_counts(result.module)
    assert not any(counts.get(k) for k in BN_KINDS), counts
    assert _parallel_conv_sums(result.module) == 0
    for probe in (x, torch.randn(1, 3, 64, 64)):
        assert rel_error(result.module(probe), model(probe)) < 1e-4
    records = {p.id: p for p in result.report.passes}
    assert records["fold_reparam"].rewrites > 0 and records["fold_reparam"].status == "applied"


def test_bn_before_1x1_and_linear_folds_but_not_before_padded_conv():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.pw = torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 6, 1, groups=2)
            self.bn2, self.k3 = torch.nn.BatchNorm2d(6), torch.nn.Conv2d(6, 6, 3, padding=1)
            self.bn3, self.fc = torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 4)

        def forward(self, x):
            y = self.k3(self.bn2(self.pw(self.bn1(x))))  # bn2 follows pw: folds as Conv->BN
            return self.fc(self.bn3(y.mean((2, 3))))

    net = Net().eval()
    for bn in (net.bn1, net.bn2, net.bn3):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 8, 5, 5)
    pipe = attn2conv.Pipeline(["fold_batchnorm"])
    result = attn2conv.convert(net, "trt", x, pipeline=pipe)
    assert result.report.passes[0].rewrites == 3
    assert not any(op_counts(result.module).get(k) for k in BN_KINDS)
    assert rel_error(result.module(x), net(x)) < 1e-5

    class PreBNPadded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.k3 = torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.k3(self.bn(x) + 0.0) if False else self.k3(self.bn(x))

    net2 = PreBNPadded().eval()
    net2.bn.running_mean.uniform_(-1, 1)
    result2 = attn2conv.convert(net2, "trt", torch.randn(1, 4, 6, 6), pipeline=attn2conv.Pipeline(["fold_batchnorm"]))
    record = result2.report.passes[0]
    assert record.rewrites == 0 and "1x1" in record.misses[0]


def test_parallel_linear_heads_merge_into_one_linear():
    class TwoHeads(torch.nn.Module):  # RepViT / LeViT style distillation heads, averaged in eval mode
        def __init__(self):
            super().__init__()
            self.head, self.head_dist = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)

        def forward(self, x):
            return (self.head(x) + self.head_dist(x)) / 2

    net = TwoHeads().eval()
    x = torch.randn(3, 8)
    result = attn2conv.convert(net, "trt", x, pipeline=attn2conv.Pipeline(["fold_reparam"]))
    counts = op_counts(result.module)
    assert counts.get("aten.linear") == 1 and not counts.get("aten.add") and not counts.get("aten.div")
    assert rel_error(result.module(x), net(x)) < 1e-6
