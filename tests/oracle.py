"""A plain single-process LT-SFT (Ansell et al., 2022, Algorithm 1): the oracle the distributed engine must match.

Deliberately naive: full copies, a full sort for the top-K, autograd for the L1 term, torch's own clipping.
Shared with the engine only what is configuration rather than algorithm: the eligibility roles, which
parameters weight decay spares, and the order of the examples.
"""

from __future__ import annotations

import torch

from ltsft_dist import eligibility as elig
from ltsft_dist.config import TrainConfig
from ltsft_dist.data import Examples, StepOrder
from ltsft_dist.engine import decays
from ltsft_dist.recipe import linear_lr


def _optimizer(model, config):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name) else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.phase1.lr)


def _train(model, order, config, phase, theta0, sparse_names, mask=None, sfts=None):
    params = dict(model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_eligible = sum(params[n].numel() for n in sparse_names)
    opt = _optimizer(model, config)
    for step in range(phase.steps):
        for g in opt.param_groups:
            g["lr"] = linear_lr(step, phase)
        sft = sfts[order.language_at(step)] if sfts else None
        if sft is not None:  # the step's language SFT, around forward and backward only
            sft.apply(model, skip_missing_heads=True)
        loss = model(**order.batch_at(step, 0)).loss
        if phase.l1:
            loss = loss + phase.l1 / n_eligible * sum((params[n] - theta0[n]).abs().sum() for n in sparse_names)
        opt.zero_grad()
        loss.backward()
        if sft is not None:
            sft.revert(model)
        if mask is not None:
            for n in sparse_names:
                params[n].grad *= mask[n]
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        opt.step()
        if mask is not None:  # weight decay moves zero-gradient elements: put the frozen ones back
            with torch.no_grad():
                for n in sparse_names:
                    params[n].copy_(torch.where(mask[n], params[n], theta0[n]))


def oracle_ltsft(model: torch.nn.Module, examples: Examples | None, config: TrainConfig, *, order=None, sfts=None):
    """Returns (mask, phi, heads): bool masks and φ per sparse parameter, dense heads after phase 2.

    `order` replaces the `StepOrder` over `examples` (e.g. a multi-source order); with `sfts` (language -> SFT),
    every step applies its language's SFT before the forward pass and reverts it after the backward pass."""
    roles = elig.resolve(model, config.kind, config.eligibility)
    elig.apply_roles(model, roles)
    sparse_names = roles.names("sparse")
    params = dict(model.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    k = config.k_for(sum(params[n].numel() for n in sparse_names))
    order = order or StepOrder(examples, config.batch_size, config.batch_size, 0, 1, config.seed)

    if config.selection == "magnitude":
        _train(model, order, config, config.phase1, theta0, sparse_names, sfts=sfts)
    flat = torch.cat([(params[n].detach() - theta0[n]).abs().reshape(-1) for n in sparse_names])
    ranking = torch.sort(flat, descending=True, stable=True).indices  # stable: ties keep (parameter, offset) order
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[ranking[:k]] = True
    mask, offset = {}, 0
    for n in sparse_names:
        numel = params[n].numel()
        mask[n] = chosen[offset:offset + numel].view(params[n].shape)
        offset += numel

    with torch.no_grad():
        for n, p in params.items():
            p.copy_(theta0[n])
    _train(model, order, config, config.phase2, theta0, sparse_names, mask, sfts)
    phi = {n: (params[n].detach() - theta0[n]) * mask[n] for n in sparse_names}
    heads = {n: params[n].detach().clone() for n in roles.names("head")}
    return mask, phi, heads
