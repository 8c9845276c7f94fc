"""Images are read upright (EXIF orientation applied) by the one reading function, wherever they are
read: ``read_image`` (the command line), the data sources (and so the audit and its report), encoded
bytes (TFDS); and images with NaN or infinite pixels become recorded per-image errors, never NaN rows."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flaxcam import cli, models
from flaxcam.data.loader import iterate_batches
from flaxcam.data.sources import ArraySource, ImageFolderSource
from flaxcam.imageio import (
    EXIF_ORIENTATION,
    ImageReadError,
    Preprocessing,
    read_image,
    read_image_bytes,
    read_image_with_size,
)

HEIGHT, WIDTH = 48, 24  # the upright picture: portrait


def _upright() -> np.ndarray:
    """A portrait picture with a red block at the top left and a blue block at the bottom (8x8 JPEG
    blocks of flat colour, so compression barely changes them)."""
    image = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    image[:16, :8] = (255, 0, 0)
    image[32:, 8:24] = (0, 0, 255)
    return image


def _sideways_jpeg(orientation: int = 6) -> bytes:
    """What a camera held upright writes: the pixels as the sensor saw them (rotated) and the EXIF tag
    that turns them upright. Orientation 6 displays the stored pixels rotated 90 degrees clockwise."""
    stored = Image.fromarray(_upright()).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    assert stored.size == (HEIGHT, WIDTH)  # landscape on disk
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _assert_upright(array: np.ndarray) -> None:
    assert array.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(array.astype(int) - _upright().astype(int)).mean() < 6


def test_read_image_applies_exif_orientation_6(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(_sideways_jpeg())
    with Image.open(path) as raw:  # the stored pixels really are sideways
        assert raw.size == (HEIGHT, WIDTH)
    _assert_upright(read_image(path))
    _, size = read_image_with_size(path)
    assert size == (HEIGHT, WIDTH)  # the upright frame
    reduced, size = read_image_with_size(path, draft_size=(12, 6))  # the fast JPEG path too
    assert size == (HEIGHT, WIDTH) and reduced.shape[0] > reduced.shape[1]
    _assert_upright(read_image_bytes(_sideways_jpeg(), name="record 3"))


def test_every_orientation_value_gives_the_upright_picture(tmp_path):
    """Orientations 1-8: the stored pixels are the upright picture under the inverse transform; the
    reader must undo it (Pillow's table of the EXIF transforms, independently of flaxcam)."""
    inverse = {
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM],
        5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_90],
        7: [Image.Transpose.TRANSVERSE],
        8: [Image.Transpose.ROTATE_270],
    }
    for orientation in range(1, 9):
        stored = Image.fromarray(_upright())
        for step in inverse.get(orientation, []):
            stored = stored.transpose(step)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        path = tmp_path / f"o{orientation}.png"
        stored.save(path, exif=exif)
        np.testing.assert_array_equal(read_image(path), _upright(), err_msg=f"orientation {orientation}")


def test_data_source_and_loader_read_upright(tmp_path):
    folder = tmp_path / "data" / "phones"
    folder.mkdir(parents=True)
    (folder / "phone.jpg").write_bytes(_sideways_jpeg())
    source = ImageFolderSource(tmp_path / "data")
    record = source[0]
    _assert_upright(record.image)
    assert record.size is None or tuple(record.size) == (HEIGHT, WIDTH)
    batch = next(iterate_batches(source, Preprocessing((HEIGHT, WIDTH), (0.0,) * 3, (1.0,) * 3), 1))
    assert batch.valid.all() and tuple(batch.sizes[0]) == (HEIGHT, WIDTH)
    _assert_upright(np.rint(batch.images[0] * 255).astype(np.uint8))


def test_explain_command_boxes_in_the_upright_frame(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(_sideways_jpeg())
    bundle = tmp_path / "model.msgpack"
    model = models.create_model("small_cnn", num_classes=3, features=[4, 8])
    variables = models.init_variables(model, (1, 16, 16, 3), seed=0)
    models.save_bundle(
        bundle,
        model_name="small_cnn",
        model_kwargs={"num_classes": 3, "features": [4, 8]},
        variables=variables,
        meta={"input_size": [16, 16], "class_names": ["a", "b", "c"]},
    )
    summary = tmp_path / "summary.json"
    arguments = [
        "explain",
        str(path),
        "--weights",
        str(bundle),
        "--top-k",
        "1",
        "--threshold",
        "0",
        "--out",
        str(tmp_path / "out"),
        "--json",
        str(summary),
    ]
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 0, result.output
    # threshold 0: the box is the whole picture, in the portrait frame (not the stored landscape one)
    assert json.loads(summary.read_text())["images"][0]["box"] == [0, 0, WIDTH, HEIGHT]


def test_float_image_with_nan_is_refused(tmp_path):
    values = np.full((6, 5), 0.5, np.float32)
    values[2, 3] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="1 NaN or infinite pixel"):
        read_image(tmp_path / "nan.tif")


def test_non_finite_images_become_recorded_errors_in_the_loader(tmp_path):
    """A float TIFF with a NaN pixel in an image folder, and a float array with an infinite pixel: each
    is one recorded error of its batch (the audit's errors table), its row invalid and all zeros."""
    folder = tmp_path / "data" / "x"
    folder.mkdir(parents=True)
    values = np.full((6, 5), 0.5, np.float32)
    values[0, 0] = np.inf
    Image.fromarray(values, mode="F").save(folder / "inf.tif")
    Image.fromarray(np.full((6, 5, 3), 90, np.uint8)).save(folder / "ok.png")
    batch = next(iterate_batches(ImageFolderSource(tmp_path / "data"), Preprocessing((4, 4)), 2))
    assert batch.valid.tolist() == [False, True]
    assert len(batch.errors) == 1 and "NaN or infinite" in batch.errors[0][2]
    assert np.isfinite(batch.images).all() and not batch.images[0].any()

    images = np.full((2, 6, 5, 3), 0.25, np.float32)
    images[1, 1, 1, 1] = np.inf
    batch = next(iterate_batches(ArraySource(images), Preprocessing((4, 4)), 2))
    assert batch.valid.tolist() == [True, False] and [e[0] for e in batch.errors] == [1]
    assert np.isfinite(batch.images).all()


def test_non_finite_model_inputs_after_preprocessing_are_recorded_errors():
    """A preprocessing that divides by a zero std turns every pixel of a channel infinite or NaN: the
    rows become recorded errors instead of NaN inputs."""
    images = np.full((3, 6, 5, 3), 100, np.uint8)
    batch = next(iterate_batches(ArraySource(images), Preprocessing((4, 4), std=(0.0, 0.2, 0.2)), 4))
    assert batch.valid.tolist() == [False, False, False, False]
    assert [e[0] for e in batch.errors] == [0, 1, 2]
    assert all("NaN or infinite model input" in e[2] for e in batch.errors)
    assert np.isfinite(batch.images).all()
