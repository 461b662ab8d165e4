"""Plain weights out of any checkpoint of a run: one CPU process, no process group, no DeepSpeed
engine (``hpcdl export``).

Where the weights come from:

- ZeRO-1, 2 and 3: the fp32 master weights in the optimizer shards, merged by DeepSpeed's own
  ``zero_to_fp32`` (every rank's shard, whatever the precision the run computed in);
- ZeRO-0: the module weights in ``mp_rank_00_model_states.pt`` (there is no sharded master copy;
  in bf16/fp16 runs they are the 16-bit weights).

Then cast to ``--dtype`` (floating tensors only), checked by loading them into the model rebuilt
from the run's config (``strict``), and written with a ``.json`` sidecar that holds what
:func:`load_exported` needs to rebuild the model (name, input shape, classes, options)::

    from hpcdl.train.export import load_exported
    model = load_exported("runs/digits/export/step00000030/model.pt")

Nothing is written unless everything before the write succeeded; the files are written to
temporaries and renamed, so a failed export leaves no partial file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcdl.errors import HpcdlError
from hpcdl.train.checkpoint import MANIFEST, complete_tags, verify_folder
from hpcdl.train.config import TrainConfig, read_run_config
from hpcdl.train.engine import DTYPES
from hpcdl.train.models import build_model
from hpcdl.util import atomic_path, atomic_write_json, get_logger

logger = get_logger(__name__)

FORMATS = ("safetensors", "pt")


@dataclass
class Exported:
    weights: Path
    sidecar: Path
    tag: str
    step: int
    source: str  # where the weights came from, in words
    tensors: int


def sidecar_path(weights: Path) -> Path:
    """The model description beside the weights: ``model.pt`` → ``model.json``."""
    return weights.with_suffix(".json")


def safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def export_weights(
    run_dir: str | Path,
    tag: str | None = None,
    fmt: str = "pt",
    dtype: str = "fp32",
    out: str | Path | None = None,
) -> Exported:
    """Export checkpoint ``tag`` (the newest that verifies by default) of ``run_dir``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise HpcdlError(f"{run_dir} is not a run folder (no config.yaml)")
    check_options(fmt, dtype)
    cfg = read_run_config(run_dir)
    root = run_dir / "checkpoints"
    tag, manifest = choose_checkpoint(root, tag)
    weights = Path(out) if out is not None else run_dir / "export" / tag / f"model.{fmt}"
    check_destination(weights)
    state, source = read_weights(root / tag, cfg.zero_stage, cfg.precision)
    state = {k: cast(v, DTYPES[dtype]) for k, v in state.items()}
    model_info = rebuild_info(cfg, run_dir)
    check_loads(model_info, state, root / tag)
    meta = {
        **model_info,
        "weights": weights.name,
        "format": fmt,
        "dtype": dtype,
        "run_dir": str(run_dir.resolve()),
        "checkpoint": tag,
        "step": manifest.get("step"),
        "zero_stage": cfg.zero_stage,
        "precision": cfg.precision,
        "source": source,
    }
    write(weights, state, fmt, meta)
    return Exported(weights, sidecar_path(weights), tag, int(meta["step"] or 0), source, len(state))


def check_options(fmt: str, dtype: str) -> None:
    if fmt not in FORMATS:
        raise HpcdlError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "safetensors" and not safetensors_available():
        raise HpcdlError(
            "format 'safetensors' needs the safetensors package, which is not installed in "
            "this environment: install it or use --format pt"
        )
    if dtype not in DTYPES:
        raise HpcdlError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")


def choose_checkpoint(root: Path, tag: str | None) -> tuple[str, dict[str, Any]]:
    """(tag, manifest) of the checkpoint to export: ``tag`` if it verifies, else the newest one
    that verifies (warning about every newer one that does not)."""
    if tag is not None:
        manifest, problem = verify_folder(root / tag)
        if problem is not None or manifest is None:
            raise HpcdlError(f"checkpoint {root / tag} cannot be exported: {problem}")
        return tag, manifest
    complete = complete_tags(root)
    for _, candidate in reversed(complete):
        manifest, problem = verify_folder(root / candidate)
        if problem is None and manifest is not None:
            return candidate, manifest
        logger.warning(f"checkpoint {root / candidate} is corrupted ({problem}); skipped")
    if complete:
        raise HpcdlError(f"no checkpoint in {root} verifies ({len(complete)} corrupted)")
    raise HpcdlError(f"no complete checkpoint in {root} (none has a {MANIFEST})")


def check_destination(weights: Path) -> None:
    """Refuse to overwrite, and fail now (before the slow part) where nothing can be written."""
    if weights.suffix == ".json":
        raise HpcdlError(f"{weights}: .json is the model description's suffix; choose another")
    for path in (weights, sidecar_path(weights)):
        if path.exists() or path.is_symlink():
            raise HpcdlError(f"{path} already exists: remove it or choose another --out")
    parent = weights.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HpcdlError(f"cannot write {weights}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HpcdlError(f"cannot write {weights}: {parent} is not writable")


def read_weights(folder: Path, zero_stage: int, precision: str) -> tuple[dict[str, Any], str]:
    """The full state dict of checkpoint ``folder`` and where it came from, in words."""
    if zero_stage == 0:
        model_file = folder / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise HpcdlError(f"{folder} has no {model_file.name}: not a ZeRO-0 checkpoint")
        states = torch.load(model_file, map_location="cpu", weights_only=False)
        return dict(states["module"]), f"module weights ({precision}, ZeRO-0 model states)"
    chatter = io.StringIO()  # DeepSpeed's import and zero_to_fp32 talk: keep the output clean
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        raise HpcdlError(f"DeepSpeed cannot consolidate {folder}: {exc}") from None
    return dict(state), f"fp32 master weights (ZeRO-{zero_stage} optimizer shards, zero_to_fp32)"


def cast(tensor: Any, dtype: torch.dtype) -> Any:
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        return tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.clone()
    return tensor


def rebuild_info(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """What :func:`hpcdl.train.models.build_model` needs: from the config, else from the data."""
    input_shape, classes = cfg.model.input_shape, cfg.model.num_classes
    if input_shape is None or classes is None:
        from hpcdl.train.preflight import inspect_data

        try:
            spec = inspect_data(cfg, str(run_dir / "config.yaml"))
        except HpcdlError as exc:
            raise HpcdlError(
                f"cannot tell the model's input shape and classes ({exc}); set model.input_shape "
                f"and model.num_classes in {run_dir / 'config.yaml'}"
            ) from None
        input_shape, classes = input_shape or spec.input_shape, classes or spec.num_classes
    return {
        "model": cfg.model.name,
        "input_shape": list(input_shape),
        "num_classes": classes,
        "options": cfg.model.options,
    }


def check_loads(info: dict[str, Any], state: dict[str, Any], folder: Path) -> None:
    model = build_model(info["model"], tuple(info["input_shape"]), info["num_classes"],
                        info["options"])  # fmt: skip
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise HpcdlError(
            f"the weights of {folder} do not fit model {info['model']!r} rebuilt from the run's "
            f"config: {' '.join(line.strip() for line in first[:2])}"
        ) from None


def write(weights: Path, state: dict[str, Any], fmt: str, meta: dict[str, Any]) -> None:
    """Weights, then sidecar, each via a temporary; on failure neither is left behind."""
    created = [p for p in [weights.parent, *weights.parent.parents] if not p.exists()]
    try:
        weights.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            if fmt == "safetensors":
                from safetensors.torch import save_file

                save_file(state, str(tmp), metadata={"hpcdl": json.dumps(meta)})
            else:
                torch.save(state, tmp)
        try:
            atomic_write_json(sidecar_path(weights), meta)
        except BaseException:
            weights.unlink(missing_ok=True)
            raise
    except OSError as exc:
        for folder in created:  # innermost first: only the folders this export made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise HpcdlError(f"cannot write {weights}: {exc.strerror or exc}") from None


def load_exported(weights: str | Path) -> torch.nn.Module:
    """The model rebuilt from an export's sidecar, with the exported weights loaded (CPU)."""
    weights = Path(weights)
    meta = json.loads(sidecar_path(weights).read_text())
    model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"],
                        meta["options"])  # fmt: skip
    if meta["format"] == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu")
    model.load_state_dict(state)
    return model.to(DTYPES[meta["dtype"]])
