"""Faithfulness evaluation of class activation maps: batched, jitted, at parity with pytorch-grad-cam
1.5.7 (``pytorch_grad_cam.metrics``) and torchcam 0.5 (``torchcam.metrics``).

Each metric is a small pure function of ``(apply_fn, variables, images, maps, targets)`` returning one
value per image (see :mod:`flaxcam.evaluation.common` for the conventions):

=====================================  ==============================================  =========
function                               reference                                       better
=====================================  ==============================================  =========
:func:`confidence_change`              pgc ``CamMultImageConfidenceChange``            higher
:func:`drop_in_confidence`             pgc ``DropInConfidence`` (absolute drop)        lower
:func:`increase_in_confidence`         pgc ``IncreaseInConfidence``, torchcam          higher
:func:`average_drop`                   torchcam ``ClassificationMetric`` (relative)    lower
:func:`deletion_insertion`             torchcam ``DeletionInsertionMetric`` (RISE)     del ↓ ins ↑
:func:`road`, :func:`road_average`,    pgc ``ROADMostRelevantFirst`` / ``Least…`` /    MoRF ↓ LeRF ↑
:func:`road_combined`                  ``…Average`` / ``ROADCombined``                 combined ↑
:func:`adcc`, :func:`arcc`             Poppi et al. 2021; pgc ``ARCC``                 higher
:func:`model_randomization`            Adebayo et al. 2018                             lower
=====================================  ==============================================  =========

:data:`METRICS` names the per-image score columns of each for :func:`evaluate` (the leaderboard).
"""

from __future__ import annotations

from flaxcam.evaluation.coherency import (
    adcc,
    arcc,
    coherency,
    complexity,
    pearson_coherency,
)
from flaxcam.evaluation.common import SCORES, target_scores
from flaxcam.evaluation.leaderboard import (
    Leaderboard,
    bootstrap_interval,
    evaluate,
    read_scores,
    write_leaderboard,
)
from flaxcam.evaluation.perturbation import (
    BASELINES,
    Curves,
    average_drop,
    baseline_images,
    confidence_change,
    deletion_insertion,
    drop_in_confidence,
    gaussian_blur,
    increase_in_confidence,
    masked_scores,
    perturbation_counts,
)
from flaxcam.evaluation.registry import METRICS, Metric, explainer, get_metrics
from flaxcam.evaluation.road import (
    DEFAULT_PERCENTILES,
    linear_imputation,
    road,
    road_average,
    road_combined,
)
from flaxcam.evaluation.sanity import model_randomization, randomize_layers

__all__ = [
    "BASELINES",
    "DEFAULT_PERCENTILES",
    "METRICS",
    "SCORES",
    "Curves",
    "Leaderboard",
    "Metric",
    "adcc",
    "arcc",
    "average_drop",
    "baseline_images",
    "bootstrap_interval",
    "coherency",
    "complexity",
    "confidence_change",
    "deletion_insertion",
    "drop_in_confidence",
    "evaluate",
    "explainer",
    "gaussian_blur",
    "get_metrics",
    "increase_in_confidence",
    "linear_imputation",
    "masked_scores",
    "model_randomization",
    "pearson_coherency",
    "perturbation_counts",
    "randomize_layers",
    "read_scores",
    "road",
    "road_average",
    "road_combined",
    "target_scores",
    "write_leaderboard",
]
