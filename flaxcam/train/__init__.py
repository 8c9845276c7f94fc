"""Training GAP- or GMP-head classifiers with optax: small pure functions around one jitted step.

Two entry points:

* :func:`train` — the full trainer: any flaxcam data source (through :mod:`flaxcam.data`'s
  ``iterate_batches``) or in-memory arrays (:class:`ArrayFeed`), AdamW with a warmup + cosine schedule,
  on-device augmentation (random horizontal flips and shifts), per-epoch evaluation, orbax checkpoints
  every ``checkpoint_every`` steps and at each epoch's end, **resume after an interruption**, a progress
  bar, and a final model bundle (:func:`flaxcam.models.save_bundle`) that ``flaxcam explain --weights``
  loads as it is. The ``flaxcam train`` command calls it.
* :func:`fit` — the minimal in-memory loop the digits demo uses (no checkpoints).

Determinism, which is what makes resuming exact: the example order of epoch ``e`` is
``numpy.random.default_rng([seed, e]).permutation(n)`` cut into full batches (the ragged tail is
dropped, so every step has one shape), and the augmentation of step ``s`` is drawn from
``numpy.random.default_rng([seed, s, 7])`` (:func:`augmentation_draws`). Both are functions of the step alone, so a run restored from the
checkpoint of step ``s`` continues with exactly the batches and augmentations the uninterrupted run
would have used (tested: the final parameters are equal).

Several processes (``jax.distributed.initialize`` before, e.g. ``flaxcam train ... --coordinator HOST:PORT
--num-processes N --process-id I``): data-parallel training over a global mesh of every process's
devices. Each global batch of ``batch_size`` examples is the one a single process would use; each
process reads only its own slice of it (:class:`DataParallel`) and feeds it to its devices
(``jax.make_array_from_process_local_data``). The step is one ``jit`` with shardings: parameters and
optimizer state replicated, the batch split over the mesh's ``data`` axis, so XLA averages the
gradients over every device of every process (no host-side all-reduce). Process 0 alone writes
``config.json``, the checkpoints, ``history.json``, ``errors.json`` and the bundle; every process reads the
checkpoint to resume. Tested with 2 processes on one machine: the same parameters as one process with
the same global batch (float tolerance), and a resumed run equals an uninterrupted one.

Modules, one job each: :mod:`~flaxcam.train.step` (the state, the loss, the jittable step, the
augmentation and order draws), :mod:`~flaxcam.train.config` (:class:`TrainConfig`, the optimizer),
:mod:`~flaxcam.train.feeds` (what the trainer reads), :mod:`~flaxcam.train.evaluation`,
:mod:`~flaxcam.train.parallel` (:class:`DataParallel`), :mod:`~flaxcam.train.checkpoints` (orbax, the
saved config), :mod:`~flaxcam.train.trainer` (:func:`train`) and :mod:`~flaxcam.train.minimal`
(:func:`fit`, :func:`accuracy`).
"""

from flaxcam.train.config import TrainConfig, make_optimizer
from flaxcam.train.evaluation import evaluate
from flaxcam.train.feeds import ArrayFeed, SourceFeed
from flaxcam.train.minimal import accuracy, fit
from flaxcam.train.parallel import DataParallel
from flaxcam.train.step import (
    TrainState,
    augment,
    augmentation_draws,
    create_train_state,
    epoch_order,
    softmax_loss,
    train_step,
    variables_of,
)
from flaxcam.train.trainer import TrainResult, train

__all__ = [
    "ArrayFeed",
    "DataParallel",
    "SourceFeed",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "accuracy",
    "augment",
    "augmentation_draws",
    "create_train_state",
    "epoch_order",
    "evaluate",
    "fit",
    "make_optimizer",
    "softmax_loss",
    "train",
    "train_step",
    "variables_of",
]
