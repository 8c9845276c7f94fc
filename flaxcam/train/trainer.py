"""The full trainer, :func:`train`: the jitted functions of a run, the epoch loop with evaluation and
checkpoints, resume, and the final model bundle."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from flaxcam.train.checkpoints import _check_resume_config, _checkpoint_manager, _restore, _save
from flaxcam.train.config import TrainConfig, make_optimizer
from flaxcam.train.evaluation import _eval_function, _evaluate_with
from flaxcam.train.feeds import _feed
from flaxcam.train.parallel import DataParallel
from flaxcam.train.step import (
    augment,
    augmentation_draws,
    create_train_state,
    epoch_order,
    train_step,
    variables_of,
)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and variables, the bundle path and the history."""

    model: nn.Module
    variables: dict[str, Any]
    bundle: Path
    history: list[dict[str, Any]]
    steps: int
    resumed_from: int | None
    errors: list[tuple[int, str, str]]
    complete: bool = True
    """False when the run stopped early (``stop_after_step``): no bundle was written."""


_COMPILED: dict[tuple, tuple] = {}


def _run_functions(
    config: TrainConfig, num_classes: int, total_steps: int, placement: DataParallel | None = None
) -> tuple:
    """``(model, model_kwargs, optimizer, init, step, evaluate)`` for a run, the jitted functions reused
    by later runs with the same definition (a resumed run in the same process does not recompile).
    Several processes (``placement.parallel``): jitted with shardings over the global mesh (state
    replicated, batches split), so the gradients are averaged over every device by XLA."""
    mesh = placement.mesh if placement is not None else None
    key = (json.dumps(config.to_dict(), sort_keys=True), num_classes, total_steps, mesh)
    if key not in _COMPILED:
        model, model_kwargs = config.build_model(num_classes)
        optimizer = make_optimizer(config, total_steps)

        def initial(rng):
            return create_train_state(model, optimizer, (1, *config.input_size, 3), rng)

        if placement is not None and placement.parallel:
            rep, data = placement.replicated, placement.data
            init = jax.jit(initial, out_shardings=rep)
            step = jax.jit(
                _step_function(model, optimizer, config), in_shardings=(rep,) + (data,) * 5, out_shardings=(rep, rep)
            )
            evaluate_fn = jax.jit(_eval_function(model), in_shardings=(rep, data, data, data), out_shardings=rep)
        else:
            init = jax.jit(initial)
            step = jax.jit(_step_function(model, optimizer, config))
            evaluate_fn = jax.jit(_eval_function(model))
        if len(_COMPILED) >= 8:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = (model, model_kwargs, optimizer, init, step, evaluate_fn)
    return _COMPILED[key]


def _step_function(model: nn.Module, optimizer: optax.GradientTransformation, config: TrainConfig) -> Callable:
    def step(state, inputs, labels, weights, flips, offsets):
        inputs = augment(inputs, flips, offsets, config.shift)
        return train_step(model, optimizer, state, inputs, labels, weights)

    return step


def train(
    config: TrainConfig,
    train_data: Any,
    *,
    out: str | Path,
    eval_data: Any = None,
    resume: bool = True,
    progress: bool = True,
    worker_count: int = 0,
    stop_after_step: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``config.model`` on ``train_data`` and write checkpoints, history and a model bundle to ``out``.

    Args:
        config: the run's definition (:class:`TrainConfig`).
        train_data, eval_data: an :class:`ArrayFeed`, a :mod:`flaxcam.data` image source, or a source spec
            such as ``"folder:PATH"``, ``"ham10000:PATH"``, ``"tfds:NAME:SPLIT"``, ``"npz:PATH"``.
        out: output folder: ``config.json``, ``checkpoints/`` (orbax), ``history.json`` (one entry per
            epoch: train loss, eval accuracy/loss), ``errors.json`` (unreadable training images) and
            ``model.msgpack`` (the final bundle, loadable by ``flaxcam explain --weights``).
        resume: continue from the latest checkpoint in ``out`` when there is one (the config must be
            the same); ``False`` starts over (old checkpoints are deleted).
        stop_after_step: stop (after checkpointing) once this global step is reached, as an
            interruption would; for tests and for splitting a long run into sessions.

    On ``KeyboardInterrupt`` the current state is checkpointed before the exception propagates, so
    rerunning the same call resumes where it stopped.
    """
    from flaxcam import distributed
    from flaxcam.files import atomic_write_text

    out = Path(out)
    placement = DataParallel(config.batch_size)  # several processes: checks the batch against the devices
    feed = _feed(train_data, config, worker_count)
    eval_feed = _feed(eval_data, config, worker_count)
    if placement.parallel:
        placement.check_same(
            {
                "config": config.to_dict(),
                "out": str(out),
                "training data": [_describe(train_data), len(feed), list(feed.class_names)],
                "evaluation data": None if eval_feed is None else [_describe(eval_data), len(eval_feed)],
                "resume": resume,
                "stop_after_step": stop_after_step,
            }
        )
        if not placement.writer:
            progress, log = False, _silent
    _check_resume_config(out, config, resume, write=placement.writer)
    steps_per_epoch = len(feed) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"need at least batch_size={config.batch_size} training examples, got {len(feed)}")
    total_steps = config.epochs * steps_per_epoch
    model, model_kwargs, _optimizer, init_fn, step_fn, evaluate_fn = _run_functions(
        config, len(feed.class_names), total_steps, placement
    )
    state = init_fn(jax.random.key(config.seed, impl="rbg"))

    if placement.writer:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    distributed.barrier("flaxcam-train-prepared")
    manager = _checkpoint_manager(out / "checkpoints", config.keep_checkpoints, placement)
    history_path = out / "history.json"
    history: list[dict[str, Any]] = []
    resumed_from = None
    if not resume:
        if placement.writer:
            for old in manager.all_steps():
                manager.delete(old)
        distributed.barrier("flaxcam-train-restart")
    elif manager.latest_step() is not None:
        state = _restore(manager, state, placement)
        resumed_from = int(state.step)
        if history_path.exists():
            history = [h for h in json.loads(history_path.read_text()) if h["step"] <= resumed_from]
        log(f"resuming from the checkpoint of step {resumed_from} in {out / 'checkpoints'}")

    start_step = step = int(state.step)
    interrupted = False
    bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", disable=not progress)
    try:
        for epoch in range(start_step // steps_per_epoch, config.epochs):
            done = int(state.step) - epoch * steps_per_epoch
            order = epoch_order(len(feed), config.seed, epoch)[
                done * config.batch_size : steps_per_epoch * config.batch_size
            ]
            losses = []
            started = time.perf_counter()
            rows = slice(placement.start, placement.stop)  # this process's rows of each global batch
            local = placement.local_order(order, config.batch_size)
            for inputs, labels, weights in feed.batches(local, placement.stop - placement.start):
                drawn = config.batch_size if placement.parallel else len(labels)  # the global batch's draws
                flips, offsets = augmentation_draws(config.seed, step, drawn, flip=config.flip, shift=config.shift)
                batch = placement.global_batch(inputs, labels, weights, flips[rows], offsets[rows])
                state, loss = step_fn(state, *batch)
                losses.append(loss)
                step += 1  # a host-side counter: no device sync per step
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    _save(manager, state, placement)
                if stop_after_step is not None and step >= stop_after_step and step % steps_per_epoch:
                    interrupted = True  # mid-epoch; at an epoch's end, finish its evaluation first
                    break
            if interrupted:
                break
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "train_loss": float(np.mean(jax.device_get(losses))) if losses else float("nan"),
                "seconds": round(time.perf_counter() - started, 2),
            }
            if eval_feed is not None:
                scores = _evaluate_with(evaluate_fn, variables_of(state), eval_feed, placement=placement)
                entry.update({f"eval_{k}": v for k, v in scores.items()})
            history.append(entry)
            _save(manager, state, placement)
            if placement.writer:
                atomic_write_text(history_path, json.dumps(history, indent=2))
            bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{entry['train_loss']:.3f}",
                **({"eval_acc": f"{entry['eval_accuracy']:.3f}"} if "eval_accuracy" in entry else {}),
            )
            if stop_after_step is not None and step >= stop_after_step and step < total_steps:
                interrupted = True
                break
    except KeyboardInterrupt:
        _save(manager, state, placement)
        log(f"interrupted: checkpoint of step {int(state.step)} saved in {out / 'checkpoints'}; rerun to resume")
        raise
    finally:
        bar.close()
    if interrupted:
        _save(manager, state, placement)
    # every process's unreadable images (each read only its own slices)
    found = [list(e) for e in getattr(feed, "errors", {}).values()]
    errors = sorted({tuple(e) for part in distributed.allgather_json(found) for e in part})
    if errors and placement.writer:
        atomic_write_text(out / "errors.json", json.dumps([list(e) for e in errors], indent=2))
        log(f"{len(errors)} training image(s) could not be used; listed in {out / 'errors.json'}")
    variables = jax.device_get(variables_of(state))
    bundle = out / "model.msgpack"
    if not interrupted and placement.writer:
        from flaxcam.models import save_bundle

        meta = {
            "input_size": list(config.input_size),
            "mean": list(config.mean),
            "std": list(config.std),
            "class_names": list(feed.class_names),
            "pooling": config.pooling,
            "steps": int(state.step),
            "history": history[-1:] if history else [],
        }
        save_bundle(bundle, model_name=config.model, model_kwargs=model_kwargs, variables=variables, meta=meta)
    manager.close()
    distributed.barrier("flaxcam-train-end")  # every process returns once process 0 has written
    return TrainResult(model, variables, bundle, history, int(state.step), resumed_from, errors, not interrupted)


def _silent(_message: str) -> None:
    """The log of processes other than 0 (process 0 speaks for the run)."""


def _describe(data: Any) -> str:
    """What identifies training data across processes: a spec as given, else its type."""
    return str(data) if isinstance(data, (str, Path)) else type(data).__name__
