"""LT-SFT written the direct way in plain PyTorch, one process: the baseline of `ltsft_e2e_over_plain_pytorch`.

The same run as `LTSFTRecipe` (AdamW with the same no-decay group, linear decay, clipping of the masked global
norm, global top-K of |θ¹ − θ⁰|, rewind, masked phase 2 with frozen elements put back onto θ⁰ after every step),
without DeepSpeed: a full θ⁰ copy, `torch.topk` on the concatenated |Δ|, bool masks on `.grad`.
"""

from __future__ import annotations

import torch

from ltsft_dist.engine import decays


def train(model: torch.nn.Module, roles: dict[str, str], batch_at, k: int, steps: tuple[int, int], lr: float,
          weight_decay: float, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Phase 1, select, rewind, phase 2; returns the selected flat positions per sparse parameter."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    sparse = [n for n in params if roles[n] == "sparse"]

    def phase(n_steps: int, masks: dict[str, torch.Tensor] | None) -> None:
        decay = [p for n, p in params.items() if decays(n)]
        no_decay = [p for n, p in params.items() if not decays(n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        for step in range(n_steps):
            for group in opt.param_groups:
                group["lr"] = lr * (n_steps - step) / n_steps
            opt.zero_grad(set_to_none=True)
            model(**batch_at(step)).loss.backward()
            with torch.no_grad():
                if masks:
                    for n in sparse:
                        params[n].grad.mul_(masks[n])
                torch.nn.utils.clip_grad_norm_(params.values(), max_grad_norm)
                opt.step()
                if masks:
                    for n in sparse:
                        torch.where(masks[n], params[n], theta0[n], out=params[n].data)

    phase(steps[0], None)
    with torch.no_grad():
        delta = torch.cat([(params[n] - theta0[n]).abs().view(-1) for n in sparse])
        flat = torch.zeros(delta.numel(), dtype=torch.bool)
        flat[torch.topk(delta, k, sorted=False).indices] = True
        masks = dict(zip(sparse, (m.view_as(params[n]) for n, m in
                                  zip(sparse, torch.split(flat, [params[n].numel() for n in sparse])))))
        for n, p in params.items():
            p.copy_(theta0[n])
    phase(steps[1], masks)
    return {n: torch.nonzero(masks[n].view(-1)).view(-1) for n in sparse}
