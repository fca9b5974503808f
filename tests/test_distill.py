"""attn2conv.distill: loss goes down, determinism, checkpoint/resume, static-batch graph students, refolds, DDP."""
from __future__ import annotations

import os
import socket

import timm
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import attn2conv
from attn2conv.distill import distill
from attn2conv.pipeline import Pipeline


def teacher_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 5)).eval()
    student = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    return teacher, student


def batches(n=6, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 12, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_distill_is_deterministic_and_lowers_the_loss():
    runs = []
    for _ in range(2):
        teacher, student = teacher_student()
        losses = []
        out = distill(student, teacher, batches(), epochs=4, lr=1e-2, progress=False,
                      on_step=lambda s, v: losses.append(v))
        runs.append((params(out), losses))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    losses = runs[0][1]
    assert len(losses) == 24 and sum(losses[-6:]) < 0.5 * sum(losses[:6])
    assert not any(p.requires_grad for p in out.parameters())


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    teacher, student = teacher_student()
    straight = distill(student, teacher, batches(), epochs=2, lr=1e-2, progress=False, label_weight=0.5)
    teacher, student = teacher_student()
    distill(student, teacher, batches(), epochs=2, lr=1e-2, progress=False, label_weight=0.5,
            checkpoint_dir=tmp_path, checkpoint_every=2, max_steps=5)
    saved = torch.load(tmp_path / "distill_last.pt", weights_only=False)
    assert saved["step"] == 5 and len(saved["losses"]) == 5
    teacher, fresh = teacher_student()  # a new process would start from a fresh student: resume loads the weights
    resumed = distill(fresh, teacher, batches(), epochs=2, lr=1e-2, progress=False, label_weight=0.5,
                      checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    assert torch.allclose(params(resumed), params(straight), atol=1e-6)


def test_distill_a_fast_graph_student_any_batch_size_with_features_and_refold():
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                depth=2, num_heads=2, num_classes=4).eval()
    data = [torch.randn(5, 3, 32, 32) for _ in range(3)]  # batch 5, the graph was captured at batch 2
    fast = attn2conv.convert(teacher, "trt-safe", torch.randn(2, 3, 32, 32), fidelity="fast", calibration=data,
                             options={"attention_to_csa": {"every": 1}},
                             pipeline=Pipeline(["layernorm_to_batchnorm", "gelu_to_relu", "attention_to_csa",
                                                "attention_to_sra", "linear_to_conv"]))
    assert fast.report.needs_distillation
    losses = []
    student = distill(fast.module, teacher, data, epochs=3, lr=2e-3, features=["blocks.1"], progress=False,
                      on_step=lambda s, v: losses.append(v))
    assert len(losses) == 9 and losses[-1] < losses[0]
    assert student.meta["refold"][0][0] == "fold_reparam" and student.meta["distill"]["steps"] == 9
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        teacher, student = teacher_student()
        losses = []
        out = distill(student, teacher, batches(size=8), epochs=2, lr=1e-2, progress=False, label_weight=0.3,
                      on_step=lambda s, v: losses.append(v))
        torch.save({"losses": losses, "params": params(out)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_cpu_processes_follow_one_process_on_the_doubled_batch(tmp_path):
    """Each of 2 gloo ranks trains on half of every batch of 8; one process trains on all 8."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    teacher, student = teacher_student()
    single_losses = []
    single = distill(student, teacher, batches(size=8), epochs=2, lr=1e-2, progress=False, label_weight=0.3,
                     on_step=lambda s, v: single_losses.append(v))
    assert torch.equal(r0["params"], r1["params"])  # DDP keeps the replicas identical
    assert len(r0["losses"]) == len(single_losses) == 12
    assert max(abs(a - b) for a, b in zip(r0["losses"], single_losses)) < 1e-4
    assert torch.allclose(r0["params"], params(single), atol=1e-4)
