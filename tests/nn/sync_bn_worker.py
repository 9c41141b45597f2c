"""One rank of the SyncBatchNorm checks (tests/nn/test_sync_batchnorm.py starts two on gloo
and CPU tensors, tests/gpu/test_sync_batchnorm_nccl.py two on nccl, one GPU each).

    python sync_bn_worker.py RANK WORLD_SIZE STORE_FILE RESULT_FILE [gloo|nccl]

Every rank builds the same models and data from fixed seeds, runs its share of the batch
through the synchronised fused models and compares, in float64, with one process running
the whole batch; it writes {check: max abs difference} as JSON to RESULT_FILE.RANK. On
nccl it also runs torchvision's ResNet-18 converted by torch.nn.SyncBatchNorm (GPU only)
beside ours.
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cnnkernels
from cnnkernels import models

torch.set_default_dtype(torch.float64)
RANK, WORLD, STORE, RESULT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
BACKEND = sys.argv[5] if len(sys.argv) > 5 else "gloo"
DEVICE = torch.device("cuda", RANK) if BACKEND == "nccl" else torch.device("cpu")
if DEVICE.type == "cuda":
    torch.cuda.set_device(DEVICE)
    torch.backends.cudnn.deterministic = True
dist.init_process_group(BACKEND, init_method=f"file://{STORE}", rank=RANK, world_size=WORLD)
results = {}


def diff(a, b) -> float:
    return 0.0 if a.numel() == 0 else (a - b).abs().max().item()


def record(name, value):
    results[name] = max(results.get(name, 0.0), float(value))


def ranks_agree(name, tensors):
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    record(name, max(diff(g, gathered[0]) for g in gathered))


def data(n, classes, size=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return x.to(DEVICE), y.to(DEVICE)


def ddp_training(name, build, steps=3, per_rank=4, classes=5):
    """(a) DDP + SyncBatchNorm training against one process on the whole batch."""
    torch.manual_seed(0)
    single = build(classes).to(DEVICE)
    synced = cnnkernels.nn.convert_sync_batchnorm(build(classes)).to(DEVICE)
    synced.load_state_dict(single.state_dict())
    ddp = DistributedDataParallel(synced)
    x, y = data(per_rank * WORLD, classes)
    mine = slice(RANK * per_rank, (RANK + 1) * per_rank)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        for model, opt, xb, yb in ((single, opt_single, x, y), (ddp, opt_ddp, x[mine], y[mine])):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    for (key, a), b in zip(single.state_dict().items(), synced.state_dict().values()):
        if a.is_floating_point():
            record(f"{name}: parameters and buffers against one process", diff(a, b))
    ranks_agree(f"{name}: parameters and buffers across ranks",
                [t for t in synced.state_dict().values() if t.is_floating_point()])


def against_torchvision(per_rank=4, classes=5):
    """(b) outputs, DDP-averaged gradients and running statistics of a fused ResNet-18
    against torchvision's on the whole batch in one process."""
    torch.manual_seed(0)
    ours = cnnkernels.nn.convert_sync_batchnorm(models.resnet18(num_classes=classes)).to(DEVICE)
    tv = torchvision.models.resnet18(num_classes=classes).to(DEVICE)
    tv.load_state_dict(ours.state_dict())
    ddp = DistributedDataParallel(ours)
    x, y = data(per_rank * WORLD, classes, seed=2)
    mine = slice(RANK * per_rank, (RANK + 1) * per_rank)
    out_tv = tv(x)
    F.cross_entropy(out_tv, y).backward()
    out = ddp(x[mine])
    F.cross_entropy(out, y[mine]).backward()
    record("resnet18 vs torchvision: outputs", diff(out, out_tv[mine]))
    compare_gradients("resnet18 vs torchvision", ours, tv)
    compare_buffers("resnet18 vs torchvision", ours, tv)


def compare_gradients(name, ours, theirs):
    """Records the largest difference of the parameters' gradients of two twins."""
    grads = dict(theirs.named_parameters())
    for key, p in ours.named_parameters():
        record(f"{name}: gradients", diff(p.grad, grads[key].grad))


def compare_buffers(name, ours, theirs):
    """Records the largest difference of the buffers (running statistics) of two twins."""
    buffers = dict(theirs.named_buffers())
    for key, b in ours.named_buffers():
        record(f"{name}: running statistics", diff(b.double(), buffers[key].double()))


def against_torch_sync_batchnorm(steps=2, per_rank=4, classes=5):
    """(b) on GPUs: ours and torchvision's ResNet-18 with torch.nn.SyncBatchNorm, both under
    DDP on the same local batches: outputs, averaged gradients and running statistics."""
    torch.manual_seed(0)
    ours = cnnkernels.nn.convert_sync_batchnorm(models.resnet18(num_classes=classes)).to(DEVICE)
    tv = torchvision.models.resnet18(num_classes=classes)
    tv.load_state_dict(ours.state_dict())
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(tv).to(DEVICE)
    pairs = [(DistributedDataParallel(m), m) for m in (ours, tv)]
    x, y = data(per_rank * WORLD, classes, seed=4)
    mine = slice(RANK * per_rank, (RANK + 1) * per_rank)
    for _ in range(steps):
        outs = []
        for ddp, model in pairs:
            model.zero_grad()
            out = ddp(x[mine])
            F.cross_entropy(out, y[mine]).backward()
            outs.append(out)
        record("resnet18 vs torch.nn.SyncBatchNorm: outputs", diff(*outs))
        compare_gradients("resnet18 vs torch.nn.SyncBatchNorm", ours, tv)
    compare_buffers("resnet18 vs torch.nn.SyncBatchNorm", ours, tv)


def uneven(name, sizes):
    """(c) local batches of different sizes, or empty: outputs, input gradients, summed
    parameter gradients and running statistics against torch's modules on the whole batch."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4))
    fused = nn.ModuleList([cnnkernels.nn.ConvBNAct.from_modules(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                                               nn.BatchNorm2d(8)),
                           cnnkernels.nn.BNActConv.from_modules(nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)),
                           nn.BatchNorm2d(4)])
    for module, (conv, bn) in zip((fused[0], fused[1]), ((plain[0], plain[1]), (plain[5], plain[3]))):
        module.load_state_dict({**{f"conv.{k}": v for k, v in conv.state_dict().items()},
                                **{f"bn.{k}": v for k, v in bn.state_dict().items()}})
    fused[2].load_state_dict(plain[6].state_dict())
    fused = cnnkernels.nn.convert_sync_batchnorm(fused).to(DEVICE)
    plain = plain.to(DEVICE)
    n = sum(sizes)
    gen = torch.Generator().manual_seed(3)
    x, weights = torch.randn(n, 3, 6, 6, generator=gen).to(DEVICE), torch.randn(n, 4, 6, 6, generator=gen).to(DEVICE)
    start = sum(sizes[:RANK])
    mine = slice(start, start + sizes[RANK])
    x_full, x_mine = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
    out_full = plain(x_full)
    (out_full * weights).sum().backward()
    out = fused[2](fused[1](fused[0](x_mine)))
    (out * weights[mine]).sum().backward()
    record(f"{name}: outputs", diff(out, out_full[mine]))
    record(f"{name}: input gradients", diff(x_mine.grad, x_full.grad[mine]))
    grads = torch.cat([p.grad.reshape(-1) for p in fused.parameters()])
    dist.all_reduce(grads)
    grads_full = torch.cat([p.grad.reshape(-1) for p in (plain[0].weight, plain[1].weight, plain[1].bias,
                                                          plain[3].weight, plain[3].bias, plain[5].weight,
                                                          plain[5].bias, plain[6].weight, plain[6].bias)])
    record(f"{name}: parameter gradients summed over ranks", diff(grads, grads_full))
    for bn_ours, bn_full in ((fused[0].bn, plain[1]), (fused[1].bn, plain[3]), (fused[2], plain[6])):
        for key in ("running_mean", "running_var"):
            record(f"{name}: running statistics", diff(getattr(bn_ours, key), getattr(bn_full, key)))


def small_densenet(classes):
    return models.densenet.DenseNet(8, (2, 2), 16, num_classes=classes)


ddp_training("resnet18", lambda classes: models.resnet18(num_classes=classes))
ddp_training("densenet", small_densenet)
against_torchvision()
uneven("batches 3 and 1", (3, 1))
uneven("an empty batch", (4, 0))
if DEVICE.type == "cuda":
    against_torch_sync_batchnorm()
with open(f"{RESULT}.{RANK}", "w") as f:
    json.dump(results, f)
dist.destroy_process_group()
