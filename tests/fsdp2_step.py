"""One distillation step of a compressed student under torch's FSDP2 (``fully_shard``), run by
tests/test_reliability.py with ``torchrun --nproc_per_node=2`` on CPU (gloo).

Each decoder layer (its compressed experts inside) is one FSDP unit, the root another; the
wrappers-only rules of tiny.yaml freeze everything else; the optimizer is AdamW over
``moedistill.param_groups.optimizer_groups`` of the sharded (DTensor) parameters. Rank 0
compares, after two steps, the gathered full weights and the step's loss with the same two
steps run whole in one process on the same global batches, and a resume from a sharded
checkpoint (torch.distributed.checkpoint) after step 1 with the uninterrupted run; prints one
JSON line. Arguments: the tests/ directory, a checkpoint directory."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, sys.argv[1])  # tests/
from test_trainer import tiny_moe  # noqa: E402

from moedistill.compression import compress_model  # noqa: E402
from moedistill.config import ParamGroupRule, ParamGroupsConfig  # noqa: E402
from moedistill.losses import distillation_loss  # noqa: E402
from moedistill.param_groups import assign, freeze, optimizer_groups  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
rules = ParamGroupsConfig(default_lr_multiplier=0.0, rules=[ParamGroupRule(r".*wrapper.*", 1.0),
                                                             ParamGroupRule(r".*shared_core.*", 0.5)])


def student():
    model = compress_model(tiny_moe(3), rank=2).train()
    plan = assign(model, rules)
    freeze(model, plan)
    return model, plan


def step(model, plan, opt, x, labels, ids, lp, n, scale):
    out = model(input_ids=x, use_cache=False).logits
    loss = distillation_loss(out, labels, ids, lp, alpha=0.5, temperature=2.0, tail="tail", num_items_in_batch=n)
    (loss.total * scale).backward()  # FSDP averages gradients over the processes: undo it for a global sum
    opt.step()
    opt.zero_grad()
    total = loss.total.detach()
    if scale > 1:
        dist.all_reduce(total)
    return float(total)


g = torch.Generator().manual_seed(1)
batches = []
for _ in range(2):
    x = torch.randint(0, 50, (4, 12), generator=g)
    ids = torch.randint(0, 50, (4, 12, 8), generator=g)
    lp = torch.log_softmax(torch.randn(4, 12, 8, generator=g), -1)
    labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)
    batches.append((x, labels, ids, lp))

ref, ref_plan = student()
sharded, plan = student()
mesh = init_device_mesh("cpu", (world,))
for layer in sharded.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(sharded, mesh=mesh)
make = lambda m, p: torch.optim.AdamW(optimizer_groups(m, p, learning_rate=1e-2, weight_decay=0.01))  # noqa: E731
opt, ref_opt = make(sharded, plan), make(ref, ref_plan)
mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
losses, ref_losses = [], []
for x, labels, ids, lp in batches:
    n = labels.ne(-100).sum()
    losses.append(step(sharded, plan, opt, x[mine], labels[mine], ids[mine], lp[mine], n, world))
    ref_losses.append(step(ref, ref_plan, ref_opt, x, labels, ids, lp, n, 1))
full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sharded.state_dict().items()}

# resume: a sharded checkpoint (torch.distributed.checkpoint, model + optimizer) written after step 1,
# loaded into a fresh sharded student, then step 2: the same weights as the uninterrupted run
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402


def sharded_run():
    model, p = student()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, p, make(model, p)


first, p1, o1 = sharded_run()
x, labels, ids, lp = batches[0]
step(first, p1, o1, x[mine], labels[mine], ids[mine], lp[mine], labels.ne(-100).sum(), world)
msd, osd = get_state_dict(first, o1)
dcp.save({"model": msd, "optim": osd}, checkpoint_id=sys.argv[2])
resumed, p2, o2 = sharded_run()
msd, osd = get_state_dict(resumed, o2)
state = {"model": msd, "optim": osd}
dcp.load(state, checkpoint_id=sys.argv[2])
set_state_dict(resumed, o2, model_state_dict=state["model"], optim_state_dict=state["optim"])
x, labels, ids, lp = batches[1]
step(resumed, p2, o2, x[mine], labels[mine], ids[mine], lp[mine], labels.ne(-100).sum(), world)
after = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in resumed.state_dict().items()}
resume_exact = all(torch.equal(after[k], full[k]) for k in full)
worst, frozen_same, sharded_params = 0.0, True, 0
start, _ = student()
for k, v in ref.state_dict().items():
    worst = max(worst, float((full[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)))
    if not (".wrapper" in k or "shared_core" in k):
        frozen_same &= torch.equal(full[k], start.state_dict()[k])
for p in sharded.parameters():
    sharded_params += type(p).__name__ == "DTensor"
if rank == 0:
    print(json.dumps({"losses": losses, "ref_losses": ref_losses, "worst_rel": worst, "frozen_unchanged": frozen_same,
                      "dtensor_params": sharded_params, "params": len(list(sharded.parameters())),
                      "resume_exact": resume_exact}))
dist.destroy_process_group()
