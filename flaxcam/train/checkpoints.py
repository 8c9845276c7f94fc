"""A run folder's checkpoints (orbax: save, restore, with one process or several) and its saved
config, which a resumed run must match."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from flaxcam.train.config import TrainConfig, _without_retired_off
from flaxcam.train.parallel import DataParallel
from flaxcam.train.step import TrainState


def _checkpoint_manager(directory: Path, keep: int, placement: DataParallel | None = None):
    """The run's orbax checkpoint manager. With several processes, process 0's writes (orbax commits a
    checkpoint by renaming its temporary folder) and every other process's only reads; each acts
    alone (``active_processes``), so saving needs no other process. The folder must exist then."""
    import orbax.checkpoint as ocp

    if placement is None or not placement.parallel:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        return ocp.CheckpointManager(directory.absolute(), options=options)
    alone = ocp.options.MultiprocessingOptions(primary_host=placement.process, active_processes={placement.process})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if placement.writer else None,
        create=False,
        read_only=not placement.writer,
        enable_async_checkpointing=False,
        multiprocessing_options=alone,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _save(manager, state: TrainState, placement: DataParallel | None = None) -> None:
    import orbax.checkpoint as ocp

    parallel = placement is not None and placement.parallel
    if placement is not None and parallel and not placement.writer:
        return
    step = int(state.step)
    if step in manager.all_steps():
        return
    # several processes: the replicated state copied to the host (each process holds all of it)
    saved = jax.device_get(state._asdict()) if parallel else state._asdict()
    manager.save(step, args=ocp.args.StandardSave(saved), force=True)
    manager.wait_until_finished()


def _restore(manager, state: TrainState, placement: DataParallel | None = None) -> TrainState:
    import orbax.checkpoint as ocp

    if placement is not None and placement.parallel:
        target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state._asdict())  # restored as NumPy
        host = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
        return TrainState(**placement.replicate(jax.device_get(host)))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state._asdict())
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
    return TrainState(**restored)


def _check_resume_config(out: Path, config: TrainConfig, resume: bool, write: bool = True) -> None:
    """Refuse to resume a run of another config in ``out``; then (``write``) save this config there.
    With several processes every process checks (the same files, so the same outcome) and process 0
    writes."""
    path = out / "config.json"
    if path.exists() and resume:
        # Keys added to TrainConfig after a run was saved take their defaults (an old run stays resumable).
        # Keys of options removed since are dropped where the run had them off (``_RETIRED_OFF``).
        saved = {**TrainConfig().to_dict(), **_without_retired_off(json.loads(path.read_text()))}
        if saved != config.to_dict():
            changed = sorted(k for k in set(saved) | set(config.to_dict()) if saved.get(k) != config.to_dict().get(k))
            raise ValueError(
                f"{out} holds a run with a different config (differs in {changed}); resume it with the same "
                f"config, pass resume=False (--restart) to start over, or choose another output folder"
            )
    if write:
        from flaxcam.files import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(config.to_dict(), indent=2))
