"""flaxcam.data: sources (arrays, .npz, image folders, HAM10000 layout, TFDS), batching, sharding."""

from __future__ import annotations

import csv
import gc

import numpy as np
import pytest
from PIL import Image

from flaxcam.data import (
    HAM10000_CLASSES,
    ArraySource,
    Batch,
    Ham10000Source,
    ImageFolderSource,
    ImageSource,
    NpzSource,
    TfdsSource,
    iterate_batches,
    make_digit_canvases,
    make_ham10000_fixture,
    open_source,
    ordered_indices,
    save_npz,
    shard_indices,
)
from flaxcam.imageio import Preprocessing

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def reference_inputs(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Independent preprocessing: Pillow bilinear resize, then (x / 255 - mean) / std in float64."""
    resized = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR), np.float64)
    return (resized / 255.0 - np.asarray(MEAN)) / np.asarray(STD)


def random_images(count, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- arrays


def test_array_source_records_and_conversions():
    rng = np.random.default_rng(0)
    images = random_images(3, (20, 30))
    labels = np.array([2, 0, 1])
    source = ArraySource(images, labels, class_names=["a", "b", "c"], ids=["x", "y", "z"])
    assert isinstance(source, ImageSource) and len(source) == 3 and source.class_names == ("a", "b", "c")
    record = source[1]
    assert record.index == 1 and record.id == "y" and record.label == 0 and record.error is None
    np.testing.assert_array_equal(record.image, images[1])
    # float [0, 1], gray, RGBA on black: compared with the float64 formulas.
    floats = rng.uniform(0, 1, (8, 9, 3))
    gray = rng.integers(0, 256, (8, 9), dtype=np.uint8)
    rgba = rng.integers(0, 256, (8, 9, 4), dtype=np.uint8)
    mixed = ArraySource([floats, gray, rgba, np.full((4, 4, 3), 2.0), np.zeros((4, 4, 5))])
    np.testing.assert_array_equal(mixed[0].image, np.rint(floats * 255).astype(np.uint8))
    np.testing.assert_array_equal(mixed[1].image, np.repeat(gray[..., None], 3, -1))
    expected = np.rint(rgba[..., :3].astype(np.float64) * rgba[..., 3:] / 255.0).astype(np.uint8)
    np.testing.assert_array_equal(mixed[2].image, expected)
    assert mixed[3].image is None and "outside [0, 1]" in mixed[3].error
    assert mixed[4].image is None and "expected (H, W)" in mixed[4].error
    assert mixed[0].label == -1 and mixed.class_names == ()
    with pytest.raises(IndexError, match="out of range"):
        source[3]
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        ArraySource(images, [0, 1])
    with pytest.raises(ValueError, match="unique"):
        ArraySource(images, ids=["a", "a", "b"])


def test_batches_equal_independent_preprocessing_and_pad():
    images = random_images(5, (30, 40), seed=1)
    source = ArraySource(images, [0, 1, 2, 1, 0])
    batches = list(iterate_batches(source, Preprocessing((24, 20), MEAN, STD), 2))
    assert len(batches) == 3 and all(isinstance(b, Batch) for b in batches)
    got = np.concatenate([b.images for b in batches])
    assert got.shape == (6, 24, 20, 3) and got.dtype == np.float32
    for i in range(5):
        np.testing.assert_allclose(got[i], reference_inputs(images[i], (24, 20)), atol=1e-5)
    last = batches[-1]
    assert last.indices.tolist() == [4, -1] and last.ids == ["4", ""] and last.valid.tolist() == [True, False]
    assert last.labels.tolist() == [0, -1] and last.labels.dtype == np.int32 and last.indices.dtype == np.int64
    assert last.sizes.tolist() == [[30, 40], [0, 0]]
    assert np.all(last.images[1] == 0) and last.errors == [] and np.isnan(last.boxes).all()
    dropped = list(iterate_batches(source, Preprocessing((24, 20), MEAN, STD), 2, drop_remainder=True))
    assert [b.indices.tolist() for b in dropped] == [[0, 1], [2, 3]]


class _FailingSource(ArraySource):
    """A source whose reader raises for index 3 (a bug or an I/O failure)."""

    def __getitem__(self, index):
        if index == 3:
            raise OSError("disk went away")
        return super().__getitem__(index)


def test_a_raising_source_is_recorded_not_fatal():
    source = _FailingSource(random_images(5, (8, 8)))
    batches = list(iterate_batches(source, Preprocessing((8, 8)), 4))
    assert [b.valid.tolist() for b in batches] == [[True, True, True, False], [True, False, False, False]]
    assert batches[0].errors == [(3, "3", "3: reading failed (OSError: disk went away)")]


def test_boxes_and_masks_map_into_the_input_frame():
    # A bright rectangle at a known box [x0, y0, x1, y1]; after resizing, the bright pixels must sit in
    # the mapped box.
    height, width, box = 60, 80, (20, 10, 52, 30)
    image = np.zeros((height, width, 3), np.uint8)
    image[box[1] : box[3], box[0] : box[2]] = 255
    mask = np.zeros((height, width), bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    source = ArraySource([image, image], boxes=[box, [np.nan] * 4], masks=[mask, None])
    size = (120, 40)
    preprocessing = Preprocessing(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    (batch,) = iterate_batches(source, preprocessing, 2)
    np.testing.assert_allclose(batch.boxes[0], [10, 20, 26, 60])
    assert np.isnan(batch.boxes[1]).all()
    rows, cols = np.nonzero(batch.images[0, ..., 0] > 0.5)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (10, 20, 26, 60)
    assert batch.has_mask.tolist() == [True, False] and batch.masks.shape == (2, *size)
    rows, cols = np.nonzero(batch.masks[0])
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (10, 20, 26, 60)
    assert not batch.masks[1].any()
    wrong = ArraySource([image], masks=[np.zeros((5, 5), bool)])
    assert "does not match" in wrong[0].error


def test_npz_source_round_trip_of_digit_canvases(tmp_path):
    canvases = make_digit_canvases(6, size=(48, 64), digit_size=(16, 24), seed=3)
    path = save_npz(
        tmp_path / "digits",
        (canvases.images * 255).round().astype(np.uint8),
        canvases.labels,
        class_names=canvases.class_names,
        boxes=canvases.boxes,
        marked=np.arange(6) % 2 == 0,
    )
    source = open_source(f"npz:{path}")
    assert isinstance(source, NpzSource) and len(source) == 6 and source.class_names == canvases.class_names
    assert list(source.extras) == ["marked"] and source.extras["marked"].tolist() == [True, False] * 3
    for i in range(6):
        record = source[i]
        assert record.label == canvases.labels[i]
        assert record.box == tuple(canvases.boxes[i])
        np.testing.assert_array_equal(record.image, (canvases.images[i] * 255).round().astype(np.uint8))
    direct = ArraySource.from_digits(canvases)
    assert direct[2].box == source[2].box
    np.testing.assert_array_equal(direct[2].image, source[2].image)
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="no 'images' array"):
        NpzSource(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------------ indices, sharding


@pytest.mark.parametrize("count,shards", [(10, 3), (7, 4), (2, 5), (0, 2), (100, 1)])
def test_shards_partition_the_indices(count, shards):
    indices = np.random.default_rng(count).permutation(count) + 5
    parts = [shard_indices(indices, k, shards) for k in range(shards)]
    np.testing.assert_array_equal(np.concatenate(parts), indices)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iterated_shards_partition_a_shuffled_source():
    source = ArraySource(random_images(11, (8, 8)))
    preprocessing = Preprocessing((8, 8))
    seen = []
    for shard in range(3):
        for batch in iterate_batches(source, preprocessing, 2, shard_index=shard, shard_count=3, shuffle=True, seed=4):
            seen.extend(batch.indices[batch.indices >= 0].tolist())
    assert sorted(seen) == list(range(11)) and seen != list(range(11))
    assert seen == ordered_indices(11, shuffle=True, seed=4).tolist()
    with pytest.raises(ValueError, match="shard_index 3"):
        list(iterate_batches(source, preprocessing, 2, shard_index=3, shard_count=3))


def test_explicit_indices_keep_their_order():
    images = random_images(9, (8, 8), seed=2)
    source = ArraySource(images)
    batches = list(iterate_batches(source, Preprocessing((8, 8), MEAN, STD), 4, indices=[7, 2, 5]))
    assert len(batches) == 1 and batches[0].indices.tolist() == [7, 2, 5, -1]
    assert batches[0].ids[:3] == ["7", "2", "5"]
    np.testing.assert_allclose(batches[0].images[0], reference_inputs(images[7], (8, 8)), atol=1e-5)
    with pytest.raises(ValueError, match="index 9 out of range"):
        list(iterate_batches(source, Preprocessing((8, 8)), 4, indices=[9]))
    assert list(iterate_batches(source, Preprocessing((8, 8)), 4, indices=[])) == []


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tmp_path):
    root = make_ham10000_fixture(tmp_path, per_class=2, size=(45, 60))
    (root / "HAM10000_images_part_2" / "ISIC_0024319.jpg").write_bytes(b"not a jpeg")
    source = Ham10000Source(root)
    preprocessing = Preprocessing((32, 32))
    alone = list(iterate_batches(source, preprocessing, 4))
    workers = list(iterate_batches(source, preprocessing, 4, worker_count=2))
    assert len(alone) == len(workers) == 4
    for a, b in zip(alone, workers):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.images, b.images)
        assert a.ids == b.ids and a.errors == b.errors
    assert sum(len(b.errors) for b in workers) == 1


# ------------------------------------------------------------------------------------------ image folders


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for cls, count in (("zebra", 2), ("ant", 3)):
        (tmp_path / cls / "nested").mkdir(parents=True)
        for k in range(count):
            image = rng.integers(0, 256, (12 + k, 10, 3), dtype=np.uint8)
            relative = f"{cls}/{'nested/' if k == 2 else ''}img{k}.png"
            Image.fromarray(image).save(tmp_path / relative)
            expected[relative] = (image, cls)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / ".hidden.png").write_bytes(b"")
    (tmp_path / "zebra" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    source = open_source(f"folder:{tmp_path}")
    assert isinstance(source, ImageFolderSource)
    assert source.class_names == ("ant", "zebra") and source.skipped == ("ant/notes.txt",)
    assert list(source.ids) == sorted([*expected, "zebra/broken.jpg"])
    for i in range(len(source)):
        record = source[i]
        if record.id == "zebra/broken.jpg":
            assert record.image is None and record.label == 1 and "broken.jpg" in record.error
            continue
        image, cls = expected[record.id]
        np.testing.assert_array_equal(record.image, image)
        assert source.class_names[record.label] == cls
    batches = list(iterate_batches(source, Preprocessing((16, 16)), 4))
    errors = [e for b in batches for e in b.errors]
    assert len(errors) == 1 and errors[0][1] == "zebra/broken.jpg"
    assert sum(int(b.valid.sum()) for b in batches) == 5
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ImageFolderSource(tmp_path / "absent")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderSource(tmp_path / "ant" / "nested")


# -------------------------------------------------------------------------------------------- HAM10000


def test_ham10000_fixture_round_trip(tmp_path):
    root = make_ham10000_fixture(tmp_path / "ham", per_class=3, seed=1)
    with open(root / "HAM10000_metadata.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
        rows = list(reader)
    assert len(rows) == 21 and sorted({r["dx"] for r in rows}) == list(HAM10000_CLASSES)
    part_1 = sorted(p.stem for p in (root / "HAM10000_images_part_1").glob("*.jpg"))
    part_2 = sorted(p.stem for p in (root / "HAM10000_images_part_2").glob("*.jpg"))
    assert part_1 and part_2 and sorted(part_1 + part_2) == sorted(r["image_id"] for r in rows)
    with Image.open(root / "HAM10000_images_part_2" / f"{part_2[0]}.jpg") as image:
        assert image.format == "JPEG" and image.size == (600, 450) and image.mode == "RGB"
    assert len({r["lesion_id"] for r in rows}) < len(rows)  # some lesions have several images

    source = open_source(f"ham10000:{root}")
    assert isinstance(source, Ham10000Source) and source.class_names == HAM10000_CLASSES
    assert list(source.ids) == [r["image_id"] for r in rows]
    for i, row in enumerate(rows):
        record = source[i]
        assert record.error is None and record.image.shape == (450, 600, 3)
        assert HAM10000_CLASSES[record.label] == row["dx"]
    # The lesion (class colour) is darker than the skin at the centre region: the images are not blank.
    assert source[0].image.std() > 10
    batches = list(iterate_batches(f"ham10000:{root}", Preprocessing((64, 64)), 8))
    assert sum(int(b.valid.sum()) for b in batches) == 21


def test_fast_jpeg_decoding_is_close_and_keeps_file_sizes(tmp_path):
    root = make_ham10000_fixture(tmp_path, per_class=1)
    preprocessing = Preprocessing((224, 224), MEAN, STD)
    (exact,) = iterate_batches(f"ham10000:{root}", preprocessing, 8)
    (fast,) = iterate_batches(f"ham10000:{root}", preprocessing, 8, fast_jpeg=True)
    assert exact.valid.sum() == fast.valid.sum() == 7
    assert fast.sizes[:7].tolist() == exact.sizes[:7].tolist() == [[450, 600]] * 7
    record = Ham10000Source(root, draft_size=(224, 224))[0]
    assert record.image.shape == (225, 300, 3) and record.size == (450, 600)  # decoded at 1/2 scale
    levels = np.abs((fast.images - exact.images) * np.asarray(STD)).mean() * 255  # in 8-bit gray levels
    assert 0 < levels < 1.5


def test_ham10000_bad_rows_are_recorded(tmp_path):
    root = make_ham10000_fixture(tmp_path, per_class=1, size=(45, 60))
    metadata = root / "HAM10000_metadata.csv"
    header, *rows = metadata.read_text().splitlines()
    first = rows[0].split(",")
    unknown_dx = ",".join([*first[:2], "melanoma", *first[3:]])
    metadata.write_text("\n".join([header, unknown_dx, *rows[1:], "HAM_9999999,ISIC_9999999,nv,histo,40.0,male,back"]))
    source = Ham10000Source(root)
    assert len(source) == 8
    assert source[0].label == -1 and "unknown dx 'melanoma'" in source[0].error and "akiec" in source[0].error
    assert source[7].label == 5 and "image file not found" in source[7].error
    assert all(source[i].error is None for i in range(1, 7))
    metadata.write_text("\n".join([header, *rows, rows[0]]))
    with pytest.raises(ValueError, match="1 duplicate image_id"):
        Ham10000Source(root)
    metadata.write_text("image,diagnosis\nISIC_1,nv\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image_id', 'dx'\]"):
        Ham10000Source(root)
    with pytest.raises(FileNotFoundError, match="no such metadata file"):
        Ham10000Source(tmp_path / "absent")


# ------------------------------------------------------------------------------------------------- TFDS


@pytest.fixture
def tfds():
    """``tensorflow_datasets``, with the garbage collector paused for the test.

    tfds resolves its imports through etils' ``lazy_imports``, which swaps ``builtins.__import__`` for
    the whole process while it runs. A garbage collection inside such a window runs finalizers whose
    imports get lazy placeholders, and pytest's unraisable-exception hook then fails on its own first
    ``import tracemalloc`` (CI saw "'LazyModule' object is not callable", 50 times, in the mock-data
    test). Importing ``tracemalloc`` first, collecting beforehand and pausing the collector until the
    test ends keeps finalizers out of those windows.
    """
    import tracemalloc  # noqa: F401  (see above)

    gc.collect()
    gc.disable()
    try:
        yield pytest.importorskip("tensorflow_datasets")
    finally:
        gc.enable()
        gc.collect()


def test_tfds_source_with_mock_data(monkeypatch, tfds):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        reference = tfds.data_source("mnist", split="train")
        source = TfdsSource("mnist", "train")
        assert len(source) == 6 and source.class_names == tuple(str(d) for d in range(10))
        assert source.image_key == "image" and source.label_key == "label"
        for i in range(6):
            record = source[i]
            example = reference[i]
            assert record.id == f"tfds:mnist:train:{i}" and record.label == int(example["label"])
            np.testing.assert_array_equal(record.image, np.repeat(example["image"], 3, axis=-1))
        opened = open_source("tfds:mnist:test")
        assert isinstance(opened, TfdsSource) and opened.split == "test"
        batches = list(iterate_batches(source, Preprocessing((28, 28), MEAN, STD), 4))
        assert [b.indices.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, -1, -1]]
        np.testing.assert_allclose(
            batches[1].images[0], reference_inputs(np.repeat(reference[4]["image"], 3, axis=-1), (28, 28)), atol=1e-5
        )


def test_tfds_ground_truth_boxes_and_masks(tfds):
    rng = np.random.default_rng(5)
    examples = []
    for k in range(3):
        mask = np.zeros((20, 30, 1), np.uint8)
        mask[4 : 10 + k, 6:27] = 255
        examples.append(
            {
                "image": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
                "label": k,
                "bbox": np.array([0.1, 0.2, 0.5, 0.9], np.float32),
                "segmentation_mask": mask,
                "objects": {"bbox": np.array([[0.1, 0.5, 0.3, 0.6], [0.25, 0.1, 0.75, 0.4]], np.float32)},
            }
        )

    def as_data_source(self, split, *args, **kwargs):
        return examples

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
        source = TfdsSource("caltech_birds2011", "train", mask_key="segmentation_mask")
        assert source.box_key == "bbox" and len(source.class_names) == 200
        record = source[2]
        assert record.label == 2 and record.error is None
        np.testing.assert_allclose(record.box, (6.0, 2.0, 27.0, 10.0), rtol=1e-6)
        np.testing.assert_array_equal(record.mask, examples[2]["segmentation_mask"][..., 0] > 0)
        (batch,) = iterate_batches(source, Preprocessing((40, 15)), 3)
        np.testing.assert_allclose(batch.boxes[0], (3.0, 4.0, 13.5, 20.0), rtol=1e-6)
        # Nearest neighbour at pixel centres: output pixel i samples input floor((i + 0.5) * h / H).
        rows = np.floor((np.arange(40) + 0.5) * 20 / 40).astype(int)
        cols = np.floor((np.arange(15) + 0.5) * 30 / 15).astype(int)
        assert batch.has_mask.all()
        for k in range(3):
            np.testing.assert_array_equal(batch.masks[k], (examples[k]["segmentation_mask"][..., 0] > 0)[rows][:, cols])
        union = TfdsSource("caltech_birds2011", "train", box_key="objects/bbox")
        np.testing.assert_allclose(union[0].box, (3.0, 2.0, 18.0, 15.0), rtol=1e-6)
        assert union[0].mask is None
        assert TfdsSource("caltech_birds2011", "train", box_key="")[0].box is None


def test_open_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown source 'csv:x'.*folder:PATH.*ham10000:PATH.*tfds:NAME"):
        open_source("csv:x")
    with pytest.raises(ValueError, match="unknown source"):
        open_source("folder:")
    with pytest.raises(FileNotFoundError, match="no such .npz file"):
        open_source(f"npz:{tmp_path / 'none.npz'}")
