"""A model over a split: the evaluation view of every sample, the outputs gathered across processes.

:func:`predict` runs any forward (both of a DeiT's heads, say) and :func:`evaluate` gives top-1 and cross-entropy.
The training loop validates each epoch with it (:mod:`distill.engine`), the evaluate stage scores every model
with it, the teacher stage measures a teacher used as it is: none of them needs the loop to run a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = ["evaluate", "predict"]


@torch.no_grad()
def predict(forward: Callable[[Tensor], Any], loader: DataLoader, accelerator: Any, augmenter: Any) -> dict[str, Any]:
    """Run ``forward`` on the eval view of every sample and gather results across processes.

    Args:
        forward: maps a normalised batch to a tensor or a tuple of tensors (e.g. both DeiT heads).
        loader: a prepared DataLoader yielding ``{"image", "label", "index"}``.
        accelerator: the accelerator the loader was prepared with.
        augmenter: provides the eval view (full image) and normalisation.

    Returns:
        ``{"outputs": Tensor or tuple of Tensors (N, C), "labels": (N,), "index": (N,)}`` on CPU,
        duplicates from uneven sharding removed by ``gather_for_metrics``.
    """
    outs: list[Any] = []
    labels, index = [], []
    for batch in loader:
        images = batch["image"]
        x = augmenter(images, augmenter.eval_params(images.shape[0]).to(images.device))
        out = forward(x)
        out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
        out, lab, idx = accelerator.gather_for_metrics((out, batch["label"], batch["index"]))
        outs.append(out)
        labels.append(lab.cpu())
        index.append(idx.cpu())
    if outs and isinstance(outs[0], tuple):
        outputs: Any = tuple(torch.cat([o[i] for o in outs]).cpu() for i in range(len(outs[0])))
    else:
        outputs = torch.cat(outs).cpu() if outs else torch.empty(0)
    return {"outputs": outputs, "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
            "index": torch.cat(index) if index else torch.empty(0, dtype=torch.long)}


def evaluate(model: nn.Module, loader: DataLoader, accelerator: Any, augmenter: Any) -> dict[str, float]:
    """Top-1 accuracy and cross-entropy of ``model`` (in eval mode) on ``loader``."""
    was_training = model.training
    model.eval()
    res = predict(model, loader, accelerator, augmenter)
    if was_training:
        model.train()
    logits, labels = res["outputs"], res["labels"]
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"acc": float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan"),
            "loss": float(torch.nn.functional.cross_entropy(logits, labels)) if len(labels) else float("nan")}
