"""Evaluate saved weights (``model.pt``) once on a dataset, in one process: the final test score."""

from __future__ import annotations

from pathlib import Path

import torch

from hpcdl.data.reader import ShardedDataset
from hpcdl.train.config import TrainConfig
from hpcdl.train.engine import score
from hpcdl.train.models import build_model, loss_fn
from hpcdl.train.preflight import inspect_data


@torch.no_grad()
def evaluate_weights(cfg: TrainConfig, weights: Path, dataset: Path) -> tuple[float, float, int]:
    """(loss, accuracy, samples) of the consolidated weights on every sample of ``dataset``."""
    spec = inspect_data(cfg, str(weights.parent / "config.yaml"))
    model = build_model(cfg.model.name, spec.input_shape, spec.num_classes, cfg.model.options)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    compute_loss = loss_fn(cfg.loss.name, cfg.loss.label_smoothing)
    data = ShardedDataset(
        dataset, 256, shuffle=False, drop_last=False, fields=[cfg.data.input, cfg.data.target]
    )
    loss_sum, correct, seen = score(model, data, cfg, compute_loss, "cpu", torch.float32).tolist()
    return loss_sum / seen, correct / seen, int(seen)
