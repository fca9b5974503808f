"""Knowledge distillation that recovers the accuracy a fidelity="fast" conversion gives up.

    fast = attn2conv.convert(model, "trt-safe", example_inputs=torch.randn(32, 3, 224, 224), fidelity="fast",
                             calibration=batches)
    student = attn2conv.distill(fast.module, model, batches, epochs=10, checkpoint_dir="ckpt")

Loss per batch (x, optional labels y):

    L = kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))          t, s: teacher and student logits
      + label_weight * CE(s, y)                                        when the batch carries labels
      + feature_weight * mean_i MSE(student feature_i, teacher feature_i)    optional, block outputs by module path

AdamW (weight decay on weights with >= 2 dims only) with a linear warm-up then cosine decay to `min_lr`, computed
over epochs x batches per epoch; gradient clipping; autocast (bf16, or fp16 with loss scaling) on CUDA when `amp` is
not False. A tqdm bar shows the loss and samples/s.

`data` is any re-iterable of batches: a tensor (one batch), or tuples/lists whose first item is the input and second
(optional) the integer labels; a DataLoader works. A one-shot iterator is read into a list once.

Students captured by attn2conv (fx.GraphModule) have a static batch size B0, the batch of the example input they
were converted with: each batch is run in chunks of B0 (the last one padded, its padding ignored by the loss), so any
batch size works; converting with the training batch size is fastest. Every floating-point parameter of the student
trains (buffers such as calibrated BN statistics and the exact passes' constant weights stay fixed).

Distributed: under `torchrun` (or with torch.distributed already initialised) the student is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA). Every rank iterates the same global batches and trains on its
slice (rank r of W takes the r-th of W equal parts), so W processes on a batch of W*b samples follow the same loss
curve as one process on the whole batch (the test checks this on CPU with gloo and 2 processes); keep the batch
size divisible by W for the equivalence to be exact. Rank 0 writes checkpoints and shows the progress bar.

Checkpoints: every `checkpoint_every` steps (and at the end) `checkpoint_dir/distill_last.pt` holds the student,
optimizer, scheduler and scaler states, the step and the loss history; with `resume=True` a run continues from it,
skipping the batches already seen, and ends with the same weights as an uninterrupted run (seeds are fixed by
`seed`; the batch order is the data's). `max_steps` stops early (the schedule still spans all epochs).

After training the exact folds run again on GraphModule students (fold_reparam, fold_batchnorm, each guarded
numerically), so the result is deployable; parameters are frozen and the module is in eval mode.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_NAME = "distill_last.pt"


@dataclass
class DistillState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    epochs: int = 1,
    *,
    lr: float = 5e-4,
    min_lr: float = 1e-6,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    temperature: float = 4.0,
    kd_weight: float = 1.0,
    label_weight: float = 0.0,
    features: Sequence[str] | dict[str, str] | None = None,
    feature_weight: float = 1.0,
    clip_grad: float | None = 5.0,
    amp: bool | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    max_steps: int | None = None,
    refold: bool = True,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Trains `student` to match `teacher` on `data`; returns the trained, re-folded student (eval mode)."""
    _seed_everything(seed)
    rank, world = _init_distributed()
    device = torch.device(device) if device is not None else (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else
        torch.device("cpu"))
    batches = data if _reiterable(data) else list(data)
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    per_epoch = len(batches) if hasattr(batches, "__len__") else sum(1 for _ in batches)
    total = max(1, epochs * per_epoch)

    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student.to(device)
    trainable = [p for p in student.parameters() if p.is_floating_point()]
    for p in trainable:
        p.requires_grad_(True)
    if not trainable:
        raise ValueError("the student has no floating-point parameters to train")
    feature_map = _feature_map(features)
    model = _StudentRunner(student, list(feature_map))
    model.train()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    teacher_features = _TeacherFeatures(teacher, list(feature_map.values()))

    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total, warmup_steps, lr, min_lr))
    use_amp = device.type == "cuda" and amp is not False
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    state = DistillState()
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = DistillState(saved["step"], list(saved["losses"]))
        torch.set_rng_state(saved["rng"])
    stop = min(total, max_steps) if max_steps is not None else total

    bar = None
    if progress and rank == 0 and state.step < stop:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=state.step, desc="distill", unit="step", dynamic_ncols=True)
    seen_samples, started = 0, time.perf_counter()
    step = state.step
    for epoch in range(step // per_epoch, epochs):
        skip = step - epoch * per_epoch  # batches of this epoch already trained before a resume
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if step >= stop:
                break
            x, y = _split_batch(batch)
            x = x.to(device)
            y = y.to(device) if y is not None else None
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                t_logits = teacher(x)
                t_feats = teacher_features.pop()
            xs, ys, ts, tfs = _shard(rank, world, x, y, t_logits, t_feats)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                s_logits, s_feats = model(xs)
                loss = _loss(s_logits.float(), ts.float(), ys, s_feats, tfs, temperature, kd_weight,
                             label_weight, feature_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainable, clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            value = _global_mean(loss.detach(), world)
            state.losses.append(value)
            state.step = step
            seen_samples += x.shape[0]
            if on_step is not None:
                on_step(step, value)
            if bar is not None:
                rate = seen_samples / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
            if ckpt is not None and checkpoint_every and step % checkpoint_every == 0:
                _save(ckpt, student, optimizer, scheduler, scaler, state, rank, world)
        if step >= stop:
            break
    if bar is not None:
        bar.close()
    if ckpt is not None:
        _save(ckpt, student, optimizer, scheduler, scaler, state, rank, world)
    teacher_features.remove()

    for p in student.parameters():
        p.requires_grad_(False)
    _set_mode(student, False)
    if refold and isinstance(student, fx.GraphModule):
        student = _refold(student.cpu()).to(device)
    if isinstance(student, fx.GraphModule):
        student.meta["distill"] = {"steps": state.step, "losses": list(state.losses), "world_size": world}
    return student


# --- pieces ------------------------------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _init_distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reiterable(data: Any) -> bool:
    return isinstance(data, torch.Tensor) or (hasattr(data, "__iter__") and iter(data) is not data)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, dict):
        x = batch.get("pixel_values", batch.get("image", batch.get("input")))
        return x, batch.get("labels", batch.get("label"))
    raise TypeError(f"a batch must be a tensor, a tuple/list whose first item is the input, or a dict; got "
                    f"{type(batch).__name__}")


def _shard(rank: int, world: int, x, y, t_logits, t_feats):
    if world == 1:
        return x, y, t_logits, t_feats
    part = lambda t: t.tensor_split(world)[rank] if t is not None else None  # noqa: E731
    return part(x), part(y), part(t_logits), [part(f) for f in t_feats]


def _loss(s, t, y, s_feats, t_feats, temperature, kd_weight, label_weight, feature_weight) -> torch.Tensor:
    T = temperature
    loss = kd_weight * T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                                        log_target=True)
    if label_weight and y is not None:
        loss = loss + label_weight * F.cross_entropy(s, y)
    if feature_weight and s_feats:
        mse = [F.mse_loss(sf.float().reshape(tf.shape), tf.float()) for sf, tf in zip(s_feats, t_feats)]
        loss = loss + feature_weight * torch.stack(mse).mean()
    return loss


def _global_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _cosine(total: int, warmup: int, lr: float, min_lr: float) -> Callable[[int], float]:
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save(path: Path, student, optimizer, scheduler, scaler, state: DistillState, rank: int, world: int) -> None:
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": state.step,
                    "losses": state.losses, "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _feature_map(features) -> dict[str, str]:
    if not features:
        return {}
    if isinstance(features, dict):
        return dict(features)
    return {p: p for p in features}


def _static_batch(gm: nn.Module) -> int | None:
    if not isinstance(gm, fx.GraphModule):
        return None
    ph = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    val = ph.meta.get("val") if ph is not None else None
    return int(val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() > 0 else None


class _StudentRunner(nn.Module):
    """Runs the student (in chunks of its static batch when it is a captured graph) and returns (logits, features).

    One module, so DistributedDataParallel sees one forward per step however many chunks it takes."""

    def __init__(self, student: nn.Module, feature_paths: list[str]):
        super().__init__()
        self.student = student
        self.batch = _static_batch(student)
        self.feature_paths = feature_paths
        self._hooked: list[torch.Tensor] = []
        self._handles = []
        self.graph_features = None
        if feature_paths and isinstance(student, fx.GraphModule):
            self.graph_features = _with_feature_outputs(student, feature_paths)
        elif feature_paths:
            for path in feature_paths:
                self._handles.append(student.get_submodule(path).register_forward_hook(
                    lambda _m, _i, out: self._hooked.append(out[0] if isinstance(out, tuple) else out)))

    def train(self, mode: bool = True) -> "_StudentRunner":
        self.training = mode
        _set_mode(self.student, mode)
        return self

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.graph_features is not None:
            out = self.graph_features(x)
            return out[0], list(out[1:])
        self._hooked = []
        out = self.student(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits, list(self._hooked)

    def forward(self, x: torch.Tensor):
        b0 = self.batch
        if b0 is None or x.shape[0] == b0:
            return self._run(x)
        n = x.shape[0]
        pad = (-n) % b0
        if pad:
            x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
        outs = [self._run(chunk) for chunk in x.split(b0)]
        logits = torch.cat([o[0] for o in outs])[:n]
        feats = [torch.cat([o[1][i] for o in outs])[:n] for i in range(len(self.feature_paths))]
        return logits, feats


def _with_feature_outputs(gm: fx.GraphModule, paths: list[str]) -> fx.GraphModule:
    """A GraphModule sharing gm's parameters whose output is (original output, last node of each module path)."""
    from attn2conv.graph import module_path

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    last: dict[str, fx.Node] = {}
    out_args = None
    for node in gm.graph.nodes:
        if node.op == "output":
            out_args = node.args[0]
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
        if node.op == "call_function":
            mp = module_path(node)
            for p in paths:
                if mp == p or mp.startswith(p + "."):
                    last[p] = node
    missing = [p for p in paths if p not in last]
    if missing:
        raise ValueError(f"feature paths not found in the student graph: {', '.join(missing)}")
    first = out_args[0] if isinstance(out_args, (tuple, list)) else out_args
    graph.output((env[first], *[env[last[p]] for p in paths]))
    return fx.GraphModule(gm, graph)


class _TeacherFeatures:
    def __init__(self, teacher: nn.Module, paths: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self.paths = paths
        self.handles = []
        for p in paths:
            def hook(_m, _i, out, p=p):
                self.values[p] = out[0] if isinstance(out, tuple) else out
            self.handles.append(teacher.get_submodule(p).register_forward_hook(hook))

    def pop(self) -> list[torch.Tensor]:
        values = [self.values[p] for p in self.paths]
        self.values = {}
        return values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _refold(gm: fx.GraphModule) -> fx.GraphModule:
    """Runs the exact folds again (training may have left foldable pairs, e.g. after a user edit), guarded."""
    from attn2conv.guard import NumericGuard
    from attn2conv.pass_infra import PassContext
    from attn2conv.pipeline import Pipeline

    inputs = gm.meta.get("example_inputs")
    if not inputs:
        batch = _static_batch(gm)
        ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
        inputs = (torch.randn(ph.meta["val"].shape),) if batch is not None else None
    if not inputs:
        return gm
    ctx = PassContext(example_inputs=tuple(inputs))
    guard = NumericGuard.for_module(gm, tuple(inputs))
    folded, records = Pipeline(["fold_reparam", "fold_batchnorm"]).run(gm, ctx, guard)
    folded.meta.update(gm.meta)
    folded.meta["refold"] = [(r.id, r.status, r.rewrites) for r in records]
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _set_mode(module: nn.Module, training: bool) -> None:
    """train()/eval(), except on torch.export graphs, which refuse both (their BatchNorms are fixed eval ops)."""
    try:
        module.train(training)
    except NotImplementedError:
        pass


class _CallableModule(type(os)):
    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


# `import attn2conv.distill` binds the submodule as the package attribute; make it callable as the function too.
import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
