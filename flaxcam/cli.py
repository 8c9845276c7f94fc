"""The ``flaxcam`` command line (typer).

Errors: every user error (a bad argument, an unreadable or unwritable path, a corrupt file, a
setting that does not fit the model) ends the command with ONE line ``error: ...`` on stderr and exit
status 2, never a traceback. One mechanism does it for every subcommand: :class:`_OneLineErrors` runs
the typer app without click's standalone handling and prints :data:`USER_ERRORS` (flaxcam's
:class:`~flaxcam.errors.UserError`, any ``ValueError`` or ``OSError``, click's usage errors) as that
line. Outputs (``--out``, ``--json``) are checked before any work, so a long run never ends by failing
to write its summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.24 carries its own copy of click: its exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover -- older typer runs on click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]  # the same module, from click

from flaxcam.errors import UserError
from flaxcam.methods import METHODS

#: The registered methods, as listed in ``--help`` and checked before any model is loaded.
METHOD_NAMES = ", ".join(sorted(METHODS))
_METHOD_HELP = f"Explanation method, one of: {METHOD_NAMES}."
_ATROUS_HELP = (
    "Atrous inference: the last stride-2 stage at stride 1, same weights, maps twice as fine "
    "(efficientnet_lite0, resnet18/34/50); with --box-rule auto, the best boxes measured (docs/localization.md)."
)
_BOX_RULE_HELP = "Box rule: paper (20% of the max, --threshold), resolution, otsu, energy, auto (docs/localization.md)."
_BOX_RULES_HELP = (
    _BOX_RULE_HELP + " Several, comma-separated (e.g. paper,auto), draw each rule's box in its own colour and record "
    "them all under 'boxes'; the first is the record's 'box'."
)

#: Exceptions that are the user's to fix: printed as one ``error:`` line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, click_exceptions.ClickException)


def one_line(message: str) -> str:
    """``message`` on one line (its lines joined by ``"; "``)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "unknown error"


def _user_error_message(error: BaseException) -> str:
    if isinstance(error, click_exceptions.ClickException):
        return one_line(error.format_message())
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in str(error):
        return one_line(f"{error.filename}: {error.strerror or error}")
    return one_line(str(error) or type(error).__name__)


class _OneLineErrors(TyperGroup):
    """The app's click group: user errors become one ``error: ...`` line on stderr with exit status 2.

    Overrides ``main`` (what the console script and typer's ``CliRunner`` both call): the commands run
    without click's standalone handling, and this method prints and exits instead."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False  # click never handles errors itself: this method does
        if not standalone_mode:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **kwargs)
        except click_exceptions.NoArgsIsHelpError as error:  # `flaxcam` alone: the help, as click shows it
            error.show()
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(130)
        except USER_ERRORS as error:
            typer.echo(f"error: {_user_error_message(error)}", err=True)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="flaxcam: class activation maps for JAX/Flax models.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from flaxcam import __version__

        typer.echo(f"flaxcam {__version__}")
        raise typer.Exit()


def default_cpu_devices() -> int:
    """The number of CPU cores this process may use (one XLA CPU device per core by default)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_cpu_devices(count: int | None) -> bool:
    """Split the host CPU into ``count`` XLA devices (default: one per core), so that ``explain`` and
    ``audit`` shard their batches over the cores (``benchmarks/results/peers_cpu_2dev.md``: the setting
    that put flaxcam ahead of torchcam on ResNet-50 on CPU). GPUs and TPUs are unaffected: the CPU
    devices are only used when no accelerator is present. Must run before JAX creates its backends;
    returns False (and changes nothing) when they already exist, or when the ``jax_num_cpu_devices``
    setting or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` was already chosen."""
    import jax
    from jax._src import xla_bridge

    if count is None:
        count = default_cpu_devices()
    if count < 1:
        raise UserError(f"--cpu-devices must be >= 1, got {count}")
    if xla_bridge.backends_are_initialized() or "xla_force_host_platform_device_count" in os.environ.get(
        "XLA_FLAGS", ""
    ):
        return False
    # chosen by the user's own code or environment (jax.config's flags are dynamic attributes, not in its stubs)
    if jax.config.jax_num_cpu_devices not in (-1, count):  # type: ignore[attr-defined]
        return False
    jax.config.update("jax_num_cpu_devices", count)
    return True


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    cpu_devices: Annotated[
        Optional[int],
        typer.Option(
            "--cpu-devices",
            min=1,
            help="On a machine without GPU/TPU: split the CPU into this many XLA devices that share each batch "
            "(default: one per core; 1 turns it off).",
        ),
    ] = None,
) -> None:
    """flaxcam: class activation maps (CAM, Grad-CAM, ...) for JAX/Flax models."""
    configure_cpu_devices(cpu_devices)


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _check_method(value: str) -> str:
    """Typer callback: ``--method`` must be a registered method (checked before any model loads)."""
    if value not in METHODS:
        raise typer.BadParameter(f"unknown method {value!r}; valid methods: {METHOD_NAMES}")
    return value


def source_spec(text: str) -> str:
    """A data source argument as :func:`flaxcam.data.open_source` reads it: ``KIND:PATH`` as given, a
    plain directory path as ``folder:PATH``, a ``.npz`` file as ``npz:PATH``."""
    from flaxcam.data.sources import SOURCE_KINDS

    kind, sep, _ = text.partition(":")
    if sep and kind in SOURCE_KINDS:
        return text
    path = Path(text)
    if path.is_dir():
        return f"folder:{text}"
    if path.suffix.lower() == ".npz" and path.is_file():
        return f"npz:{text}"
    raise UserError(
        f"unknown source {text!r}: expected an image folder (class subfolders), a .npz file, or one of "
        "folder:PATH, ham10000:PATH, tfds:NAME[:SPLIT], npz:PATH"
    )


def _probe_writable(folder: Path) -> None:
    """Create and delete a file in ``folder`` (``os.access`` says yes to root even on a read-only mount)."""
    fd, name = tempfile.mkstemp(prefix=".flaxcam-write-check-", dir=folder)
    os.close(fd)
    os.unlink(name)


def prepare_output_dir(path: Path, option: str) -> Path:
    """Create the output folder ``path`` (of command-line option ``option``) and check that it can be
    written, before any work; a :class:`UserError` says why not."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe_writable(path)
    except OSError as error:
        raise UserError(f"{option} {path}: cannot write there ({error.strerror or error})") from None
    return path


def check_output_file(path: Path | None, option: str) -> None:
    """Check, before any work, that the file ``path`` (of option ``option``) can be written: not a
    folder, its folder creatable and writable. ``-`` (standard output) and None pass."""
    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _probe_writable(parent)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as error:
        raise UserError(f"{option} {path}: cannot write there ({error.strerror or error})") from None


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file, one per line (blank lines at the end ignored)."""
    try:
        names = path.read_text("utf-8").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--class-names {path}: cannot read ({error})") from None
    names = [name.strip() for name in names]
    if not any(names):
        raise UserError(f"--class-names {path}: no class names (expected one per line)")
    return names


def num_outputs(model: Any, variables: Any, size: Sequence[int]) -> int:
    """The number of classes (logits) a model outputs for ``(1, H, W, 3)`` inputs (shapes only)."""
    import jax
    import numpy as np

    return int(jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, *size, 3), np.float32)).shape[-1])


def resolve_class_names(
    stored: Sequence[str] | None, count: int, file: Path | None, where: str, imagenet_default: bool = False
) -> list[str]:
    """The class names of a model with ``count`` outputs: from ``file`` (``--class-names``) if given,
    else those stored with the model (``where`` names it), else the ImageNet names for a 1000-class
    torchvision checkpoint (``imagenet_default``), else ``class_0, class_1, ...``. A count that does not
    match the model is a :class:`UserError`."""
    if file is not None:
        names = read_class_names(file)
        if len(names) != count:
            raise UserError(
                f"--class-names {file} has {len(names)} class names but the model ({where}) has {count} classes"
            )
        return names
    if stored:
        names = [str(name) for name in stored]
        if len(names) != count:
            raise UserError(
                f"{where} has {len(names)} class names but its model has {count} outputs; "
                "fix the bundle or give --class-names FILE (one name per line)"
            )
        return names
    if imagenet_default and count == 1000:
        from flaxcam import models

        return list(models.imagenet_class_names())
    return [f"class_{i}" for i in range(count)]


def _load_model(model_name: str | None, weights: Path | None, class_names: Path | None = None):
    """(model, variables, meta): a flaxcam bundle, a torchvision ResNet checkpoint (``.pth``, ``.pt``,
    ``.safetensors``), the pretrained default (EfficientNet-Lite0, ImageNet) or a registry model with
    random weights. ``meta["class_names"]`` always matches the model's outputs (see
    :func:`resolve_class_names`)."""
    from flaxcam import models

    try:
        model, variables, meta = models.load_model(model_name, weights)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    except ValueError as error:
        if weights is None:  # an unknown --model
            raise typer.BadParameter(str(error)) from None
        raise
    if meta["random_weights"]:
        _say(f"warning: {model_name} with RANDOM weights (no --weights given): the maps are not meaningful")
    where, imagenet_default = meta["source"], meta["imagenet_order"]
    size = tuple(int(v) for v in meta.get("input_size", (224, 224)))
    count = num_outputs(model, variables, size)
    meta["class_names"] = resolve_class_names(meta.get("class_names"), count, class_names, where, imagenet_default)
    return model, variables, meta


def check_top_k(top_k: int | None, num_classes: int, default: int = 3) -> int:
    """``--top-k``: None → ``min(default, number of classes)``; a given value must be in [1, number of
    classes]."""
    if top_k is None:
        return min(default, num_classes)
    if not 1 <= top_k <= num_classes:
        raise UserError(
            f"--top-k {top_k} is out of range: the model has {num_classes} classes (1 <= k <= {num_classes})"
        )
    return top_k


def _unique_figure_path(out: Path, stem: str, method: str, taken: set[Path]) -> Path:
    path = out / f"{stem}_{method}.png"
    index = 1
    while path in taken:
        path = out / f"{stem}-{index}_{method}.png"
        index += 1
    taken.add(path)
    return path


def run_explain(
    images: Sequence[Path],
    *,
    model_name: str | None = None,
    weights: Path | None = None,
    method: str = "gradcam",
    layer: str | None = None,
    top_k: int | None = None,
    out: Path = Path("flaxcam_out"),
    json_path: Path | None = None,
    batch_size: int = 16,
    alpha: float = 0.5,
    threshold: float = 0.2,
    labels: Sequence[int | None] | None = None,
    progress: bool | None = None,
    class_names: Path | None = None,
    box_rule: str | Sequence[str] = "paper",
    atrous: bool = False,
    input_size: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Explain image files and write one seed-style figure per image (and a JSON summary; ``json_path``
    ``-`` writes it to standard output).

    Returns ``(records, errors)``; unreadable files are reported in ``errors`` and skipped, the others
    are still processed. ``labels`` optionally gives each image's true class for the figure;
    ``class_names`` a file of class names (one per line) for the model's outputs. ``atrous``: explain
    with :func:`flaxcam.models.atrous` (same weights, maps twice as fine: 14x14 instead of 7x7 for the
    default model). ``input_size``: resize the images to ``(H, W)`` instead of the model's input size
    (test-time upscaling: 448x448 gives the default model 14x14 maps; with ``box_rule="auto"`` the best
    boxes measured, docs/localization.md). Each record has the input and map sizes it was explained at.
    ``box_rule``: a rule of :data:`flaxcam.localize.BOX_RULES`, or several (a sequence or a comma-separated
    string): each rule's box is drawn in its own colour and recorded under ``"boxes"``; ``"box"`` is the
    first rule's.
    """
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    import flaxcam
    from flaxcam import colormap, localize, models, viz
    from flaxcam.imageio import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, Preprocessing, read_image

    rules = box_rules(box_rule)
    _check_method(method)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    prepare_output_dir(out, "--out")
    check_output_file(json_path, "--json")
    model, variables, meta = _load_model(model_name, weights, class_names)
    if atrous:
        model = models.atrous(model)  # a model without the option: a ValueError naming the models that have it
    size = tuple(input_size or meta.get("input_size", (224, 224)))
    preprocessing = Preprocessing(
        size=(int(size[0]), int(size[1])),
        mean=tuple(meta.get("mean", IMAGENET_MEAN)),
        std=tuple(meta.get("std", IMAGENET_STD)),
    )
    records: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    taken: set[Path] = set()
    show_progress = len(images) > batch_size if progress is None else progress
    labels = list(labels) if labels is not None else [None] * len(images)
    class_names_of_model = meta["class_names"]
    k = check_top_k(top_k, len(class_names_of_model))  # default: 3, or every class of a smaller model

    with tqdm(total=len(images), desc=f"explain ({method})", unit="img", disable=not show_progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk_paths, chunk_images, chunk_labels = [], [], []
            for path, label in zip(images[start : start + batch_size], labels[start : start + batch_size]):
                try:
                    chunk_images.append(read_image(path))
                    chunk_paths.append(Path(path))
                    chunk_labels.append(label)
                except ImageReadError as error:
                    _say(f"error: {error}")
                    errors.append({"file": str(path), "error": str(error)})
            if not chunk_images:
                bar.update(len(images[start : start + batch_size]))
                continue
            resized, inputs = preprocessing(chunk_images)
            explanation = flaxcam.explain(model, variables, inputs, method=method, layer=layer, top_k=k)
            first = explanation.maps[:, 0]
            map_shape = localize.native_shape(explanation.low_res)
            boxes = {rule: localize.boxes(first, threshold=threshold, rule=rule, map_shape=map_shape) for rule in rules}
            overlays = colormap.overlay(jax.numpy.asarray(resized), first, alpha=alpha)
            host = jax.device_get(
                {
                    "probabilities": explanation.probabilities,
                    "targets": explanation.targets,
                    "boxes": boxes,
                    "overlays": overlays,
                }
            )
            for i, path in enumerate(chunk_paths):
                original = chunk_images[i]
                scale = np.array([original.shape[1] / size[1], original.shape[0] / size[0]] * 2)
                boxes_input = {rule: host["boxes"][rule][i] for rule in rules}
                boxes_original = {rule: [round(v) for v in (b * scale)] for rule, b in boxes_input.items()}
                probabilities = host["probabilities"][i]
                top = [
                    {"class": int(c), "name": class_names_of_model[int(c)], "probability": float(probabilities[int(c)])}
                    for c in host["targets"][i]
                ]
                figure = viz.seed_figure(
                    original,
                    probabilities,
                    class_names_of_model,
                    true_label=chunk_labels[i],
                    preprocessed=inputs[i],
                    overlay=host["overlays"][i],
                    box=boxes_input if len(rules) > 1 else boxes_input[rules[0]],
                    title=f"{method} · {explanation.layer}",
                )
                figure_path = _unique_figure_path(out, path.stem, method, taken)
                viz.save_figure(figure, figure_path)
                records.append(
                    {
                        "file": str(path),
                        "figure": str(figure_path),
                        "top_k": top,
                        "target": top[0],
                        "box": boxes_original[rules[0]],
                        "boxes": boxes_original,
                        "method": method,
                        "layer": explanation.layer,
                        "input_size": [int(size[0]), int(size[1])],
                        "map_size": list(map_shape),
                    }
                )
            bar.update(len(images[start : start + batch_size]))

    if json_path is not None:
        summary = json.dumps({"images": records, "errors": errors}, indent=2)
        if str(json_path) == "-":
            typer.echo(summary)
        else:
            json_path.write_text(summary)
    return records, errors


def box_rules(box_rule: str | Sequence[str]) -> list[str]:
    """The box rules of ``box_rule`` (one rule, a comma-separated string or a sequence), checked, in order and
    without repeats; at most :data:`flaxcam.viz.BOX_COLORS` of them (one colour each)."""
    from flaxcam import localize, viz

    names = box_rule.split(",") if isinstance(box_rule, str) else list(box_rule)
    rules = list(dict.fromkeys(localize.check_rule(name.strip()) for name in names))
    if len(rules) > len(viz.BOX_COLORS):
        raise UserError(f"--box-rule: at most {len(viz.BOX_COLORS)} rules can be drawn at once, got {len(rules)}")
    return rules


_WEIGHTS_HELP = (
    "A flaxcam bundle (.msgpack, e.g. from `make demo` or `flaxcam train`) or a torchvision ResNet checkpoint "
    "(.pth, .pt or .safetensors; any number of classes)."
)
_CLASS_NAMES_HELP = "Text file of class names, one per line, in the model's output order (default: the weights' own)."

# The options several commands share, defined once (each command gives its own default).
ModelOption = Annotated[
    Optional[str],
    typer.Option(help="Default: efficientnet_lite0 with ImageNet weights. Another registry name runs random weights."),
]
WeightsOption = Annotated[Optional[Path], typer.Option(help=_WEIGHTS_HELP)]
ClassNamesOption = Annotated[Optional[Path], typer.Option("--class-names", help=_CLASS_NAMES_HELP)]
MethodOption = Annotated[str, typer.Option(help=_METHOD_HELP, callback=_check_method)]
LayerOption = Annotated[Optional[str], typer.Option(help="Target layer (default: the last spatial layer).")]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Images per jitted call.")]
BoxRuleOption = Annotated[str, typer.Option("--box-rule", help=_BOX_RULE_HELP)]


@app.command("explain")
def explain_command(
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads).")],
    model: ModelOption = None,
    weights: WeightsOption = None,
    class_names: ClassNamesOption = None,
    method: MethodOption = "gradcam",
    layer: LayerOption = None,
    top_k: Annotated[
        Optional[int], typer.Option("--top-k", min=1, help="Classes listed per image; maps for each (default 3).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the figures.")] = Path("flaxcam_out"),
    json_path: Annotated[
        Optional[Path], typer.Option("--json", help="Write a JSON summary here (- : standard output).")
    ] = None,
    batch_size: BatchSizeOption = 16,
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Box threshold, a fraction of each map's maximum.")
    ] = 0.2,
    box_rule: Annotated[str, typer.Option("--box-rule", help=_BOX_RULES_HELP)] = "paper",
    atrous: Annotated[bool, typer.Option("--atrous", help=_ATROUS_HELP)] = False,
    size: Annotated[
        Optional[str],
        typer.Option(
            help="Resize the images to H,W instead of the model's input size (test-time upscaling: 448,448 gives the default model 14x14 maps, the best boxes measured with --box-rule auto)."
        ),
    ] = None,
) -> None:
    """Explain IMAGES: one figure per image (input + top-3, preprocessed, overlay with box)."""
    records, errors = run_explain(
        images,
        model_name=model,
        weights=weights,
        method=method,
        layer=layer,
        top_k=top_k,
        out=out,
        json_path=json_path,
        batch_size=batch_size,
        threshold=threshold,
        class_names=class_names,
        box_rule=box_rule,
        atrous=atrous,
        input_size=_parse_size(size) if size is not None else None,
    )
    to_stdout = json_path is not None and str(json_path) == "-"  # keep standard output pure JSON
    for record in records:
        target = record["target"]
        others = "".join(f" {rule}={box}" for rule, box in list(record["boxes"].items())[1:])
        line = (
            f"{record['file']}: {target['name']} (p={target['probability']:.3f}) box={record['box']}{others}"
            f" -> {record['figure']}"
        )
        typer.echo(line, err=to_stdout)
    if errors:
        _say(f"{len(errors)} of {len(images)} file(s) could not be read")
        raise typer.Exit(code=1)


def _preprocessing_of(meta: dict[str, Any]):
    from flaxcam.imageio import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

    size = tuple(meta.get("input_size", (224, 224)))
    return Preprocessing(
        size=(int(size[0]), int(size[1])),
        mean=tuple(meta.get("mean", IMAGENET_MEAN)),
        std=tuple(meta.get("std", IMAGENET_STD)),
    )


#: The multi-process options of `audit` and `train` (named after `jax.distributed.initialize`'s arguments;
#: see :func:`flaxcam.distributed.initialize`), defined once.
CoordinatorOption = Annotated[
    Optional[str],
    typer.Option(
        "--coordinator",
        help="Multi-process run: HOST:PORT of process 0 (or 'auto': detect a TPU pod / SLURM / Open MPI; untested). Run the same command once per process.",
    ),
]
NumProcessesOption = Annotated[
    Optional[int], typer.Option("--num-processes", help="Multi-process run: number of processes.")
]
ProcessIdOption = Annotated[
    Optional[int], typer.Option("--process-id", help="Multi-process run: this process's id, 0..N-1.")
]


@app.command("audit")
def audit_command(
    source: Annotated[
        str,
        typer.Argument(
            help="An image folder (class subfolders), a .npz file, or folder:PATH | ham10000:PATH | tfds:NAME[:SPLIT] | npz:PATH"
        ),
    ],
    out: Annotated[Path, typer.Option(help="Audit directory (Parquet parts + manifest); rerun to resume.")],
    model: ModelOption = None,
    weights: WeightsOption = None,
    class_names: ClassNamesOption = None,
    method: MethodOption = "cam",
    layer: LayerOption = None,
    batch_size: BatchSizeOption = 64,
    top_k: Annotated[
        Optional[int], typer.Option("--top-k", min=1, help="Classes recorded per image (default 3).")
    ] = None,
    target: Annotated[str, typer.Option(help="Class explained: predicted | label.")] = "predicted",
    resume: Annotated[bool, typer.Option(help="Resume an existing audit in --out (--no-resume starts over).")] = True,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Audit at most this many remaining images now.")] = None,
    workers: Annotated[int, typer.Option(min=0, help="grain reader processes (0: a thread).")] = 0,
    box_rule: BoxRuleOption = "paper",
    coordinator: CoordinatorOption = None,
    num_processes: NumProcessesOption = None,
    process_id: ProcessIdOption = None,
) -> None:
    """Audit every image of SOURCE: predictions, boxes, attention statistics and maps, in Parquet."""
    from flaxcam import audit, distributed
    from flaxcam.audit.errors import AuditError

    distributed.initialize(coordinator, num_processes, process_id)  # before any JAX computation
    if target not in ("predicted", "label"):
        raise typer.BadParameter(f"--target {target!r}: expected predicted or label")
    spec = source_spec(source)
    prepare_output_dir(out, "--out")
    loaded_model, variables, meta = _load_model(model, weights, class_names)
    top_k = check_top_k(top_k, len(meta["class_names"]))
    try:
        with _naming_the_manifest(out):
            result = audit.run(
                spec,
                loaded_model,
                variables,
                out,
                preprocessing=_preprocessing_of(meta),
                method=method,
                layer=layer,
                batch_size=batch_size,
                top_k=top_k,
                target=target,
                resume=resume,
                limit=limit,
                worker_count=workers,
                box_rule=box_rule,
                class_names=meta["class_names"],
                model_info={
                    "model": model or ("bundle" if weights else "efficientnet_lite0"),
                    "weights": str(weights) if weights else None,
                },
            )
    except AuditError as error:  # disk full, folder in use, other settings: one line, nothing lost
        raise UserError(str(error)) from None
    state = "complete" if result.complete else "incomplete"
    typer.echo(
        f"{out}: {result.rows} images, {result.errors} unreadable, of {result.total} ({state}); this run: "
        f"{result.processed} images in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s)"
    )


def _check_audit_dir(audit_dir: Path) -> None:
    if not audit_dir.is_dir():
        raise UserError(f"{audit_dir}: no such audit folder (run `flaxcam audit SOURCE --out {audit_dir}` first)")


@contextlib.contextmanager
def _naming_the_manifest(audit_dir: Path) -> Iterator[None]:
    """A JSON error while reading an audit is its manifest's: name the file."""
    try:
        yield
    except json.JSONDecodeError as error:
        raise UserError(f"{audit_dir / 'manifest.json'}: corrupt, not valid JSON ({error})") from None


@app.command("report")
def report_command(
    audit_dir: Annotated[Path, typer.Argument(help="An audit directory written by `flaxcam audit`.")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file (default AUDIT_DIR/report.html).")] = None,
    gallery_size: Annotated[int, typer.Option(min=1, help="Images per gallery.")] = 12,
) -> None:
    """Write one self-contained HTML report of an audit (classes ranked by unusual attention)."""
    import duckdb

    from flaxcam.audit.report import write_report

    _check_audit_dir(audit_dir)
    check_output_file(out if out is not None else audit_dir / "report.html", "--out")
    try:
        with _naming_the_manifest(audit_dir):
            written = write_report(audit_dir, out, gallery_size=gallery_size)
    except duckdb.Error as error:  # e.g. a truncated or corrupt Parquet part
        raise UserError(f"{audit_dir}: cannot read the audit: {_first_line(error)}") from None
    typer.echo(str(written))


def _first_line(error: BaseException) -> str:
    """The first line of a DuckDB error (the rest repeats the SQL with a caret)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@app.command("query")
def query_command(
    audit_dir: Annotated[Path, typer.Argument(help="An audit directory written by `flaxcam audit`.")],
    sql: Annotated[str, typer.Argument(help="DuckDB SQL over the views `audit`, `errors` and the table `classes`.")],
    allow_files: Annotated[
        bool,
        typer.Option("--allow-files", help="Let the SQL read and write other files (off: only the audit's parts)."),
    ] = False,
) -> None:
    """Run SQL over an audit, e.g. "SELECT label, avg(corner_max_share) FROM audit GROUP BY 1"."""
    from flaxcam._optional import require

    duckdb = require("duckdb", extra="audit")

    from flaxcam.audit.query import format_table, query

    if not sql.strip():
        raise UserError('empty SQL query; e.g. "SELECT count(*) FROM audit"')
    _check_audit_dir(audit_dir)
    try:
        with _naming_the_manifest(audit_dir):
            columns, rows = query(audit_dir, sql, allow_files=allow_files)
    except duckdb.PermissionException as error:
        raise UserError(
            f"query failed: {_first_line(error)} (only the audit's own files can be read; --allow-files lifts this)"
        ) from None
    except duckdb.Error as error:
        raise UserError(f"query failed: {_first_line(error)}") from None
    typer.echo(format_table(columns, rows))


@app.command("layers")
def layers_command(
    model: ModelOption = None,
    weights: WeightsOption = None,
    size: Annotated[
        Optional[str], typer.Option(help="Input size H,W (default: the model's own, else 224,224).")
    ] = None,
    spatial: Annotated[
        bool, typer.Option("--spatial", help="Only layers with (batch, height, width, channels) outputs.")
    ] = False,
) -> None:
    """List the model's layers (the names `--layer` takes) with their output shapes for one image."""
    import jax
    import numpy as np

    import flaxcam

    loaded_model, variables, meta = _load_model(model, weights)
    height, width = _parse_size(size) if size is not None else tuple(int(v) for v in meta.get("input_size", (224, 224)))
    layers = flaxcam.list_layers(loaded_model, variables, jax.ShapeDtypeStruct((1, height, width, 3), np.float32))
    shown = [info for info in layers if info.is_spatial or not spatial]
    width_name = max((len(info.name) for info in shown), default=5)
    width_type = max((len(info.module_type) for info in shown), default=4)
    typer.echo(f"{'layer':<{width_name}}  {'type':<{width_type}}  output shape")
    for info in shown:
        typer.echo(f"{info.name:<{width_name}}  {info.module_type:<{width_type}}  {tuple(info.shape)}")


def _parse_size(text: str) -> tuple[int, int]:
    """``"H,W"`` → ``(H, W)``, both positive."""
    try:
        height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--size {text!r}: expected H,W such as 224,224") from None
    if height < 1 or width < 1:
        raise typer.BadParameter(f"--size {text!r}: both sizes must be >= 1")
    return height, width


@app.command("train")
def train_command(
    source: Annotated[
        str, typer.Argument(help="Training data: folder:PATH, ham10000:PATH, tfds:NAME[:SPLIT] or npz:PATH.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoints/, history.json, model.msgpack.")] = Path(
        "flaxcam_train"
    ),
    val: Annotated[
        Optional[str], typer.Option(help="Evaluation data (same spec forms), scored after each epoch.")
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option(help="JSON file with TrainConfig keys; the options below override it.")
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="Registry model: small_cnn, resnet18, resnet34, resnet50, vgg16, efficientnet_lite0."),
    ] = None,
    model_kwargs: Annotated[
        Optional[str], typer.Option(help="Model constructor arguments as JSON, e.g. '{\"features\": [16, 32, 64]}'.")
    ] = None,
    pooling: Annotated[
        Optional[str], typer.Option(help="Global pooling before the classifier: avg (GAP) or max (GMP).")
    ] = None,
    size: Annotated[
        Optional[str], typer.Option(help="Model input size H,W (images are resized), e.g. 224,224.")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, warmup + cosine).")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips.")] = None,
    shift: Annotated[Optional[int], typer.Option(help="Random shifts of up to this many pixels.")] = None,
    checkpoint_every: Annotated[
        Optional[int], typer.Option(help="Checkpoint every N steps (0: each epoch's end only).")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialisation, data order and augmentation.")] = None,
    restart: Annotated[bool, typer.Option(help="Start over instead of resuming from OUT's latest checkpoint.")] = False,
    workers: Annotated[int, typer.Option(help="grain worker processes for reading images (0: in this process).")] = 0,
    stop_after_step: Annotated[
        Optional[int],
        typer.Option(
            "--stop-after-step",
            min=1,
            help="Stop (after a checkpoint) once this step is reached; rerun without it to continue.",
        ),
    ] = None,
    coordinator: CoordinatorOption = None,
    num_processes: NumProcessesOption = None,
    process_id: ProcessIdOption = None,
) -> None:
    """Train a GAP/GMP-head classifier on SOURCE; rerun the same command to resume after an interruption.

    The final bundle OUT/model.msgpack loads straight into `flaxcam explain --weights`. Several processes
    (--coordinator/--num-processes/--process-id, the same command once per process): data-parallel over
    every process's devices, the same parameters as one process with the same --batch-size (global)."""
    from flaxcam import distributed
    from flaxcam.train import TrainConfig, train

    distributed.initialize(coordinator, num_processes, process_id)  # before any JAX computation

    try:
        values: dict[str, Any] = json.loads(config.read_text()) if config is not None else {}
    except json.JSONDecodeError as error:
        raise UserError(f"--config {config}: not valid JSON ({error})") from None
    source = source_spec(source)
    val = source_spec(val) if val is not None else None
    overrides = {
        "model": model,
        "model_kwargs": json.loads(model_kwargs) if model_kwargs is not None else None,
        "pooling": pooling,
        "input_size": list(_parse_size(size)) if size is not None else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "flip": flip,
        "shift": shift,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    run_config = TrainConfig.from_dict(values)
    try:
        result = train(
            run_config,
            source,
            out=out,
            eval_data=val,
            resume=not restart,
            worker_count=workers,
            stop_after_step=stop_after_step,
            log=_say,
        )
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items())
    if not result.complete:
        typer.echo(f"stopped after step {result.steps}: checkpoint in {out / 'checkpoints'}; rerun to continue")
        return
    typer.echo(f"trained {result.steps} steps ({summary}) -> {result.bundle}")


@app.command("evaluate")
def evaluate_command(
    source: Annotated[str, typer.Argument(help="folder:PATH | ham10000:PATH | tfds:NAME[:SPLIT] | npz:PATH")],
    out: Annotated[Path, typer.Option(help="Output directory (Parquet scores, leaderboard.html); rerun to resume.")],
    model: ModelOption = None,
    weights: WeightsOption = None,
    methods: Annotated[str, typer.Option(help=f"all, or a comma-separated list of: {METHOD_NAMES}.")] = "gradcam",
    metrics: Annotated[
        str,
        typer.Option(
            help="all, or a comma-separated list of: confidence, deletion_insertion, road, adcc, randomization."
        ),
    ] = "all",
    layer: LayerOption = None,
    target: Annotated[str, typer.Option(help="Class explained and scored: predicted | label.")] = "predicted",
    batch_size: BatchSizeOption = 8,
    steps: Annotated[int, typer.Option(help="Deletion / insertion steps.")] = 20,
    baseline: Annotated[str, typer.Option(help="Deletion / insertion baseline: zeros | mean | blur.")] = "zeros",
    score: Annotated[str, typer.Option(help="Score of the target class: softmax | logit.")] = "softmax",
    chunk_size: Annotated[int, typer.Option(help="Perturbed images per forward pass (bounds memory).")] = 32,
    resume: Annotated[bool, typer.Option(help="Resume an evaluation in --out (--no-resume starts over).")] = True,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate at most this many remaining images now.")] = None,
) -> None:
    """Explain every image of SOURCE with each method, score each faithfulness metric, write a leaderboard."""
    from flaxcam import evaluation

    loaded_model, variables, meta = _load_model(model, weights)
    board = evaluation.evaluate(
        source,
        loaded_model,
        variables,
        out,
        preprocessing=_preprocessing_of(meta),
        methods=methods,
        metrics=metrics,
        layer=layer,
        target=target,
        batch_size=batch_size,
        resume=resume,
        limit=limit,
        progress=True,
        options={"steps": steps, "baseline": baseline, "score": score, "chunk_size": chunk_size},
    )
    typer.echo(f"{board.images} images ({board.errors} unreadable) -> {board.html}")


def main() -> None:
    """Console entry point (user errors: one ``error:`` line, exit status 2; see :class:`_OneLineErrors`)."""
    app()


@app.command("bench")
def bench_command(
    model: Annotated[
        Optional[str],
        typer.Option(
            help="A registered model (resnet50, small_cnn, ...: random weights) or your own as package.module:factory (returns (model, variables) for linen, or an nnx.Module). Default: the pretrained EfficientNet-Lite0."
        ),
    ] = None,
    weights: Annotated[
        Optional[Path],
        typer.Option(help="A flaxcam bundle (flaxcam train writes one) or a torchvision ResNet checkpoint (.pth)."),
    ] = None,
    methods: Annotated[
        Optional[str],
        typer.Option(
            help="all, or comma-separated names (default: every method with about one forward pass per image)."
        ),
    ] = None,
    layer: Annotated[
        Optional[str], typer.Option(help="Target layer (default: the model's, else the last spatial one).")
    ] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8,64,256.")] = "1,8",
    size: Annotated[
        Optional[str], typer.Option(help="Image size H,W (default: the model's input size, else 224,224).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    devices: Annotated[
        str, typer.Option(help="N or all: shard each batch over N devices (on a CPU, N emulated devices).")
    ] = "all",
    rounds: Annotated[
        int, typer.Option(help="Timed rounds, interleaved across candidates (median and best reported).")
    ] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed calls per candidate before timing (the first compiles).")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Folder for bench_<platform>.jsonl, .md and .png.")] = None,
    profile: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder for one jax.profiler trace per method; adds the forward / backward / method / post-processing split."
        ),
    ] = None,
    peers: Annotated[
        bool,
        typer.Option(
            help="Also time pytorch-grad-cam, torchcam and captum on the same torchvision model (parity extra)."
        ),
    ] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU cores for the worker processes (default: all).")] = None,
    chunk_size: Annotated[int, typer.Option(help="Masked images per forward pass of the score-based methods.")] = 32,
    method_options: Annotated[
        Optional[str],
        typer.Option(help="Method options as JSON, e.g. '{\"num_samples\": 8}' (each to the methods that have it)."),
    ] = None,
) -> None:
    """Benchmark explanation speed on your model and hardware: images/s, ratio to the forward pass,
    compile time, latency, peak memory, per method and batch size (see docs/bench.md)."""
    from flaxcam.bench.command import command_line, run

    options = {
        "model": model,
        "weights": weights,
        "methods": methods,
        "layer": layer,
        "batch": batch,
        "size": size,
        "dtype": dtype,
        "devices": devices,
        "rounds": rounds,
        "warmup": warmup,
        "out": out,
        "profile": profile,
        "peers": peers,
        "threads": threads,
        "chunk_size": chunk_size,
        "method_options": method_options,
    }
    arguments: dict[str, Any] = {("batches" if k == "batch" else k): v for k, v in options.items()}
    arguments["method_options"] = json.loads(method_options) if method_options else None
    run(**arguments, command=command_line(options))


if __name__ == "__main__":
    main()
