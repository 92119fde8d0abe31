"""A cheap screen: rank pruned candidates in seconds, before any fine-tune is spent on them.

The proxy of a policy is the negated mean task loss of the pruned model on a
fixed handful of validation batches, after

- **BatchNorm re-estimation** (EagleEye, ECCV'20) when the model has BatchNorm: pruning upstream channels
  leaves the running statistics of later BatchNorm layers describing activations that no longer exist;
  they are recomputed as a plain average over a few training batches (only the BatchNorm layers in
  training mode, nothing learned);
- **a few fine-tune steps** when it has none (RNNs, language models): ``steps`` optimizer steps on the same
  seeded data order as the full fine-tune.

Higher is better, like the study's score. Loss, not the metric: on a few hundred items a loss separates
candidates whose accuracies tie. How well the proxy ranks is measured, not assumed: every trial records its
proxy next to its fine-tuned score and the search reports their Spearman and Kendall rank correlations
(:func:`rank_correlation`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hwprune import inputs

from hwprune.train import has_batchnorm, recalibrate_batchnorm  # noqa: F401 - re-exported (older imports)

__all__ = ["Screen", "has_batchnorm", "recalibrate_batchnorm", "rank_correlation"]

@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Any], task: Any) -> float:
    """The task's loss averaged over ``batches`` (weighted by batch size), the model in eval mode."""
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, n = 0.0, 0
    for x, y in batches:
        out = inputs.call(model, inputs.to_device(x, dev))
        total += float(task.loss(out, y.to(dev))) * len(y)
        n += len(y)
    return total / max(n, 1)


class Screen:
    """Scores policies of one dense model by the proxy (see the module doc).

    Args:
        setup: the search's :class:`~hwprune.resolve.Setup` (dense model, data, task).
        spec: the search spec (exclude, importance, seed, lr, train batch size, fine-tune steps, device).
        importance_batches: the batches data-driven importance uses (also the BatchNorm batches).
        steps: fine-tune steps for models without BatchNorm (None: ``max(1, finetune_steps // 20)``).
    """

    def __init__(self, setup: Any, spec: Any, importance_batches: list[Any], steps: int | None = None) -> None:
        from hwprune.train import few_batches

        self.setup, self.spec, self.batches = setup, spec, importance_batches
        self.bn = has_batchnorm(setup.model)
        self.steps = 0 if self.bn else (max(1, spec.finetune_steps // 20) if steps is None else steps)
        self.val = few_batches(setup.data.val, n=2, batch_size=128, seed=spec.seed + 1)  # fixed for every policy
        self.bn_batches = importance_batches or few_batches(setup.data.train, n=4, batch_size=64, seed=spec.seed)

    @property
    def method(self) -> str:
        return ("BatchNorm re-estimation on {} batches".format(len(self.bn_batches)) if self.bn
                else f"{self.steps}-step fine-tune") + f", loss on {sum(len(y) for _, y in self.val)} val items"

    def score(self, policy: Any) -> float:
        """The proxy of ``policy``: higher is better."""
        from hwprune.apply import apply_policy
        from hwprune.train import finetune

        s, setup = self.spec, self.setup
        model = apply_policy(setup.model, policy, setup.example, exclude=s.exclude, importance=s.importance,
                             batches=self.batches, loss=setup.task.loss)
        if self.bn:
            recalibrate_batchnorm(model, self.bn_batches)
        elif self.steps:
            finetune(model, setup.data.train, self.steps, lr=s.lr, batch_size=s.train_batch_size, seed=s.seed,
                     device=s.device, task=setup.task, teacher=setup.model, distill=s.distill)
        return -mean_loss(model, self.val, setup.task)


def rank_correlation(proxy: list[float], final: list[float]) -> dict[str, Any] | None:
    """Spearman's rho and Kendall's tau between proxies and fine-tuned scores (None below 3 pairs or when
    either side is constant)."""
    import math

    if len(proxy) < 3 or len(set(proxy)) < 2 or len(set(final)) < 2:
        return None
    from scipy.stats import kendalltau, spearmanr  # ~1 s to import: only where there is something to rank

    rho, tau = spearmanr(proxy, final).statistic, kendalltau(proxy, final).statistic
    if math.isnan(rho) or math.isnan(tau):
        return None
    return {"spearman": round(float(rho), 4), "kendall": round(float(tau), 4), "pairs": len(proxy)}
