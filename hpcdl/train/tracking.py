"""Rank 0's tracker of a run: metrics.jsonl and its W&B run, in the mode the run was made with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcdl.errors import HpcdlError
from hpcdl.track import Tracker
from hpcdl.train.config import TrainConfig


def make_tracker(
    cfg: TrainConfig, run_dir: Path, rank: int, site_values: dict[str, Any] | None = None
) -> Tracker:
    """Rank 0's metrics and W&B run. The W&B mode: the config's, else the one recorded in the run
    folder when it was made (``site.json``), else the site profile's."""
    from hpcdl.site import load_site

    mode = cfg.log.wandb_mode or (site_values or {}).get("wandb_mode")
    if mode is None and rank == 0:
        try:
            mode = load_site(cfg.job.site).wandb_mode
        except HpcdlError:
            mode = "offline"
    return Tracker(
        run_dir,
        enabled=rank == 0,
        config=cfg.model_dump(mode="json"),
        name=run_dir.name,
        wandb=cfg.log.wandb,
        wandb_mode=mode or "disabled",
        wandb_project=cfg.log.wandb_project,
        wandb_group=cfg.log.wandb_group,
        wandb_id=cfg.log.wandb_id,
        wandb_tags=cfg.log.wandb_tags,
    )
