"""Fast fidelity end to end on real data, on CPU in a few minutes: scikit-learn's handwritten digits.

    python examples/digits_fast_distill.py            # prints teacher / student-before / student-after accuracy
    python examples/digits_fast_distill.py --mlp-hidden-ratio 0.5   # MLPs also pruned to 0.5 x width (mlp_prune)

1. Data: the 1,797 8x8 digit images that ship with scikit-learn, upsampled (bilinear) to 32x32, split 80/20
   (stratified, fixed seed) into training and held-out sets.
2. Teacher: a small timm ViT (patch 8 -> 4x4 tokens + class token, width 64, depth 4, 2 heads) trained from scratch.
3. attn2conv.convert(teacher, "trt-safe", fidelity="fast") with the architectural passes of the fast preset:
   LayerNorm -> calibrated BatchNorm (folded), GELU -> ReLU, blocks 0-2 -> Next-ViT MHCA convolution blocks, block 3
   -> spatial-reduction attention (the default plan, Next-ViT's hybrid strategy; options={"attention_to_csa":
   {"conv_kind": "csa"}} gives NVIDIA CSA blocks instead). --mlp-hidden-ratio R also narrows every MLP to R x width
   hidden units (options={"mlp_prune": {"hidden_ratio": R}}; the teacher has 2, so 0.5 keeps a quarter, as 1 does
   for DeiT-S/Swin-T), keeping the units with the largest calibration activation x fc2 column norm.
4. attn2conv.distill(student, teacher, training batches): KD on softened logits plus the labels.
5. The rest of the fast trt-safe preset (the exact passes: folds, conv-only attention core, layout clean-up) runs on
   the distilled student, each pass guarded numerically; the result has no op trt-safe rejects.
   Training the architectural graph and lowering after is much cheaper than training the lowered one (its
   broadcast attention products and decomposed softmax cost far more in backward than in forward).
6. Held-out accuracy of the teacher, the student straight after conversion, and the distilled, lowered student.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

import attn2conv

BATCH = 64


def load_digits_32(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target,
                                           random_state=seed)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


class Batches:
    """Re-iterable training batches of exactly BATCH samples, reshuffled and randomly shifted (+-2 px) each pass."""

    def __init__(self, x, y, seed: int = 0, augment: bool = True):
        self.x, self.y, self.seed, self.augment, self.epoch = x, y, seed, augment, 0

    def __len__(self):
        return len(self.x) // BATCH

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.x), generator=g)
        for i in range(len(self)):
            idx = order[i * BATCH:(i + 1) * BATCH]
            xb = self.x[idx]
            if self.augment:
                padded = F.pad(xb, (2, 2, 2, 2), value=-1.0)
                dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
                xb = padded[:, :, dy:dy + 32, dx:dx + 32]
            yield xb, self.y[idx]


def make_teacher():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, in_chans=1,
                             embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)


def train_teacher(model, data: Batches, epochs: int, lr: float = 2e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(data), pct_start=0.1)
    model.train()
    for _ in range(epochs):
        for xb, yb in data:
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    """Held-out accuracy in %, in batches of BATCH (a converted graph has that static batch; the tail is padded)."""
    correct = 0
    for i in range(0, len(x), BATCH):
        xb = x[i:i + BATCH]
        n = len(xb)
        if n < BATCH:
            xb = torch.cat([xb, xb[:1].expand(BATCH - n, *xb.shape[1:])])
        correct += (model(xb)[:n].argmax(1) == y[i:i + n]).sum().item()
    return 100.0 * correct / len(x)


def lower(student, preset, example):
    """Runs the exact passes of the fast preset on the distilled graph; returns (module, legal for trt-safe)."""
    from attn2conv.guard import NumericGuard
    from attn2conv.legality import illegal_ops
    from attn2conv.pass_infra import PassContext
    from attn2conv.targets import resolve_target

    profile = resolve_target("trt-safe")
    exact = attn2conv.Pipeline([p for p in preset if p.exact])
    guard = NumericGuard.for_module(student, (example,))
    module, records = exact.run(student, PassContext(example_inputs=(example,), profile=profile), guard)
    for r in records:
        print(f"  {r.id:<20} {r.status:<11} rewrites {r.rewrites:<3} rel.err {r.rel_error if r.rel_error is not None else '-'}")
    legal = not [op for op in illegal_ops(module, profile) if op.severity == "error"]
    return module, legal


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--distill-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mlp-hidden-ratio", type=float, help="also prune MLPs to this many hidden units per channel")
    ap.add_argument("--json", help="write the accuracies and timings to this file")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load_digits_32(args.seed)
    train = Batches(x_train, y_train, seed=args.seed)

    print(f"digits: {len(y_train)} training / {len(y_test)} held-out images, 32x32")
    teacher = train_teacher(make_teacher(), train, args.teacher_epochs)
    t_teacher = time.perf_counter() - start
    acc_teacher = accuracy(teacher, x_test, y_test)
    print(f"teacher (ViT, trained from scratch, {args.teacher_epochs} epochs): {acc_teacher:.2f}% held-out "
          f"[{t_teacher:.0f}s]")

    calibration = [xb for xb, _ in Batches(x_train, y_train, seed=args.seed + 1, augment=False)][:4]
    preset = attn2conv.Pipeline.for_target("trt-safe", "fast")
    arch = [p for p in preset if not p.exact]
    fast = attn2conv.convert(teacher, "trt-safe", example_inputs=x_train[:BATCH], fidelity="fast",
                             calibration=calibration, pipeline=attn2conv.Pipeline(arch),
                             options=({"mlp_prune": {"hidden_ratio": args.mlp_hidden_ratio}}
                                      if args.mlp_hidden_ratio else None))
    print(fast.report.to_table())
    acc_before = accuracy(fast.module, x_test, y_test)
    print(f"student after convert(fidelity='fast'), before distillation: {acc_before:.2f}% held-out")

    student = attn2conv.distill(fast.module, teacher, train, epochs=args.distill_epochs, lr=2e-3, warmup_steps=20,
                                temperature=2.0, label_weight=0.5, seed=args.seed)
    acc_trained = accuracy(student, x_test, y_test)
    print(f"student after distillation ({args.distill_epochs} epochs): {acc_trained:.2f}% held-out")
    deployable, legal = lower(student, preset, x_train[:BATCH])
    acc_after = accuracy(deployable, x_test, y_test)
    total = time.perf_counter() - start
    print(f"distilled student after the exact trt-safe passes: {acc_after:.2f}% held-out; "
          f"no op trt-safe rejects: {legal}")
    result = {"teacher": acc_teacher, "student_before": acc_before, "student_after": acc_after,
              "student_after_before_lowering": acc_trained, "gap": acc_teacher - acc_after, "legal": legal,
              "seconds": total, "mlp_hidden_ratio": args.mlp_hidden_ratio,
              "test_samples": len(y_test)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
