"""The methods: one small pure function per method, registered where it is defined (``@register``).

A method returns per-channel *contributions* ``(h, w, C)`` for one image and one target (or
``(B, T, h, w, C)`` for a batch, for the score-based methods that run forward passes); the raw map is
their sum over channels, or their first principal component for the Eigen methods and with
``eigen_smooth=True``. :func:`flaxcam.explain` vmaps per-image methods over the batch and the targets,
then applies ReLU, min-max normalization and resizing.
"""

from __future__ import annotations

from flaxcam.methods.attention import legrad
from flaxcam.methods.baseline import randomcam
from flaxcam.methods.cam import cam
from flaxcam.methods.dff import dff
from flaxcam.methods.eigen import (
    eigencam,
    eigengradcam,
    first_component_projection,
    kernel_pca_projection,
    kpcacam,
    segeigencam,
    sign_corrected_projection,
)
from flaxcam.methods.fem import fem
from flaxcam.methods.finer import finer_target_scores, finercam
from flaxcam.methods.fullgrad import fullgrad
from flaxcam.methods.gradient import (
    gradcam,
    gradcam_elementwise,
    gradcam_plusplus,
    gradcam_plusplus_exact,
    hirescam,
    layercam,
    shapleycam,
    xgradcam,
)
from flaxcam.methods.guided import (
    GuidedModel,
    guided_backprop,
    guided_relu,
    guided_relus,
)
from flaxcam.methods.noise import smoothgradcam_plusplus, standard_normal_at
from flaxcam.methods.refine import LAYER_FUSIONS, refinecam
from flaxcam.methods.registry import INPUTS, METHODS, Method, get_method, register
from flaxcam.methods.score import ablationcam, faster_scorecam, iscam, scorecam, sscam
from flaxcam.methods.sess import sess

#: ``Method.reduction`` → the per-image, per-target function turning ``(h, w, C)`` contributions into an
#: ``(h, w)`` map (``"sum"``, the channel sum, is done by the pipeline).
REDUCTIONS = {
    "projection": first_component_projection,
    "signed_projection": sign_corrected_projection,
    "kernel_projection": kernel_pca_projection,
}

__all__ = [
    "INPUTS",
    "LAYER_FUSIONS",
    "METHODS",
    "REDUCTIONS",
    "GuidedModel",
    "Method",
    "ablationcam",
    "cam",
    "dff",
    "eigencam",
    "eigengradcam",
    "faster_scorecam",
    "fem",
    "finer_target_scores",
    "finercam",
    "first_component_projection",
    "fullgrad",
    "get_method",
    "gradcam",
    "gradcam_elementwise",
    "gradcam_plusplus",
    "gradcam_plusplus_exact",
    "guided_backprop",
    "guided_relu",
    "guided_relus",
    "hirescam",
    "iscam",
    "kernel_pca_projection",
    "kpcacam",
    "layercam",
    "legrad",
    "randomcam",
    "refinecam",
    "register",
    "scorecam",
    "segeigencam",
    "sess",
    "shapleycam",
    "sign_corrected_projection",
    "smoothgradcam_plusplus",
    "sscam",
    "standard_normal_at",
    "xgradcam",
]
