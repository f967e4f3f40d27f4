"""Ready-made multi-task workloads: MultiDigits (two real scikit-learn digits side by
side, one task per digit) on a small shared network."""

from __future__ import annotations

import torch
from torch import nn

from workbench.data import multidigits


class MultiDigitsNet(nn.Module):
    """Shared MLP trunk over the 8x16 image, one linear head per task (left, right)."""

    def __init__(self, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(128, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({"left": nn.Linear(hidden, 10), "right": nn.Linear(hidden, 10)})

    def forward(self, batch):
        h = self.trunk(batch["image"])
        return {name: head(h) for name, head in self.heads.items()}


def multidigits_tensors(split: str = "train", n: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    ds = multidigits(split, n=n, seed=seed)
    return {"image": torch.tensor(ds["image"]), "left": torch.tensor(ds["left"]), "right": torch.tensor(ds["right"])}


def batch_sampler(data: dict[str, torch.Tensor], batch_size: int, seed: int = 0):
    """``step -> batch``: a seeded function of the step, so resumed runs see the same batches."""
    n = len(next(iter(data.values())))

    def sample(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (batch_size,), generator=g)
        return {k: v[idx] for k, v in data.items()}

    return sample


def digit_losses() -> dict:
    ce = nn.functional.cross_entropy
    return {"left": lambda out, b: ce(out, b["left"]), "right": lambda out, b: ce(out, b["right"])}


def accuracy(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(data)
    return {t: float((out[t].argmax(-1) == data[t]).float().mean()) for t in out}
