"""Datasets: the procedural faces and the local loaders (folder, celeba, mnist, digits), nothing downloaded."""
import gzip
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from genfast.data import DATASETS, FACE_FACTORS, ImageDataset, load_dataset, make_faces
from genfast.data import _render_faces


def test_faces_are_deterministic_per_seed_with_factors_in_range():
    images, factors, names = make_faces(40, seed=3)
    again, factors_again, _ = make_faces(40, seed=3)
    other, _, _ = make_faces(40, seed=4)
    assert images.shape == (40, 3, 64, 64) and images.dtype == torch.float32
    assert factors.shape == (40, len(FACE_FACTORS)) and names == FACE_FACTORS
    assert images.min() >= 0 and images.max() <= 1
    assert factors.min() >= 0 and factors.max() <= 1
    assert torch.equal(images, again) and torch.equal(factors, factors_again)
    assert not torch.equal(images, other)
    # the first n faces of a larger draw are the same faces
    assert torch.equal(make_faces(10, seed=3)[0], images[:10])
    assert make_faces(4, seed=0, image_size=32)[0].shape == (4, 3, 32, 32)


def _sweep(factor: str, values):
    base = torch.full((len(values), len(FACE_FACTORS)), 0.5)
    base[:, FACE_FACTORS.index(factor)] = torch.tensor(values)
    return _render_faces(base, 64)


def _changed_rows_and_columns(a, b, threshold=0.02):
    changed = (a - b).abs().amax(dim=0) > threshold  # (H, W)
    rows = changed.any(dim=1).nonzero().flatten()
    cols = changed.any(dim=0).nonzero().flatten()
    return rows, cols


def test_smile_changes_only_the_mouth_region():
    frown, smile = _sweep("smile", [0.0, 1.0])
    rows, cols = _changed_rows_and_columns(frown, smile)
    assert rows.numel() > 0
    # the mouth sits around y = 0.45 in [-1, 1] coordinates, i.e. row ≈ 46 of 64, and in the middle third
    assert rows.min() >= 38 and rows.max() <= 54, rows
    assert cols.min() >= 18 and cols.max() <= 46, cols


def test_every_factor_changes_the_image():
    for factor in FACE_FACTORS:
        low, high = _sweep(factor, [0.1, 0.9])
        changed = ((low - high).abs().amax(dim=0) > 0.1).float().mean()
        assert changed > 0.005, (factor, changed)  # over 0.5% of the pixels (smile 0.1 → 0.9: 1.0%)


def test_lighting_moves_the_bright_side():
    left, right = _sweep("lighting", [0.0, 1.0])
    brightness = lambda img, cols: img[:, 20:44, cols].mean()  # noqa: E731
    assert brightness(left, slice(12, 28)) > brightness(left, slice(36, 52))
    assert brightness(right, slice(36, 52)) > brightness(right, slice(12, 28))


def test_rotation_shifts_the_features_sideways():
    left, right = _sweep("rotation", [0.0, 1.0])
    # the pupils are the darkest pixels of the eye row: their mean column moves right with the yaw
    def pupil_column(img):
        eye_rows = img[:, 26:36].mean(dim=0)  # (10, W)
        dark = (eye_rows < 0.15).float()
        return (dark * torch.arange(64.0)).sum() / dark.sum()
    assert pupil_column(right) > pupil_column(left) + 4


def test_load_faces_dataset():
    dataset = load_dataset("faces", num_samples=12, seed=5, image_size=32)
    assert isinstance(dataset, ImageDataset) and len(dataset) == 12
    assert dataset.channels == 3 and dataset.image_size == 32
    assert dataset.factor_names == FACE_FACTORS and dataset.factors.shape == (12, 5)
    item = dataset[3]
    assert item.shape == (3, 32, 32) and item.dtype == torch.float32
    images, factors, _ = make_faces(12, seed=5, image_size=32)
    torch.testing.assert_close(item, images[3], atol=0.5 / 255 + 1e-6, rtol=0)  # stored as uint8
    assert torch.equal(dataset.factors, factors)


def _write_png(path, size=(20, 12), colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_loader_skips_corrupt_files_with_one_warning(tmp_path):
    _write_png(tmp_path / "a.png")
    _write_png(tmp_path / "sub" / "b.PNG", colour=(0, 0, 255))
    Image.new("L", (8, 8), 128).save(tmp_path / "sub" / "c.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match="skipped 2 of 5 image files") as record:
        dataset = load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert len(record) == 1
    assert len(dataset) == 3 and dataset.channels == 3 and dataset.factors is None
    red = dataset[0]
    assert red.shape == (3, 8, 8)
    torch.testing.assert_close(red[:, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(dataset[2][:, 0, 0], torch.full((3,), 128 / 255))  # grey L image → RGB


def test_a_file_truncated_after_its_header_is_skipped_on_access_with_one_warning(tmp_path):
    """Header intact, pixel data cut (PNG and JPEG): the file passes the scan; on access it is counted in
    ``damaged`` and the next decodable file takes its place, with one warning naming it, every time the same."""
    _write_png(tmp_path / "ok.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name in ("cut.png", "cut.jpg"):
        Image.fromarray(noise).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
    dataset = load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert len(dataset) == 3 and [p.name for p in dataset.files] == ["cut.jpg", "cut.png", "ok.png"]
    with pytest.warns(UserWarning, match="skipping damaged image file .*cut.jpg") as record:
        first = [dataset[i] for i in range(3)]
    assert len(record) == 1
    assert [p.name for p in dataset.damaged] == ["cut.jpg", "cut.png"]
    ok = dataset[2]
    assert all(torch.equal(image, ok) for image in first)  # both damaged files are replaced by ok.png
    assert all(torch.equal(dataset[i], ok) for i in range(3))  # and again, without a new warning


def test_training_goes_on_past_damaged_images_and_resumes(tmp_path):
    from genfast.cli import main

    (tmp_path / "data").mkdir()
    for i in range(6):
        noise = np.random.default_rng(i).integers(0, 256, (28, 28, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "data" / f"{i}.png")
    data = (tmp_path / "data" / "3.png").read_bytes()
    (tmp_path / "data" / "3.png").write_bytes(data[:len(data) // 2])
    flags = ["train", "vae", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "28",
             "--latent-dim", "2", "--base-channels", "8", "--batch-size", "2", "--backend", "torch", "--quiet",
             "--out", str(tmp_path / "run")]
    with pytest.warns(UserWarning, match="damaged image"):
        assert main([*flags, "--max-steps", "3"]) == 0
        assert main([*flags, "--max-steps", "5", "--resume"]) == 0


def test_folder_loader_center_crops_to_a_square(tmp_path):
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    image[:, 10:20] = 255  # the central 10×10 square is white, the sides black
    Image.fromarray(image).save(tmp_path / "wide.png")
    dataset = load_dataset("folder", data_dir=tmp_path, image_size=10)
    torch.testing.assert_close(dataset[0], torch.ones(3, 10, 10))


def test_missing_or_empty_folders_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("folder", data_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images .* found in .*empty"):
        load_dataset("folder", data_dir=tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipped 1 of 1"), pytest.raises(FileNotFoundError, match="readable"):
        load_dataset("folder", data_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("folder")
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("cifar10")


def test_celeba_center_crop_148_and_resize(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    image = np.zeros((218, 178, 3), dtype=np.uint8)
    top, left = (218 - 148) // 2, (178 - 148) // 2
    image[top:top + 148, left:left + 148] = (0, 200, 0)  # the crop is green, everything outside it black
    for i in range(3):
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=95)
    dataset = load_dataset("celeba", data_dir=tmp_path, image_size=16)
    assert len(dataset) == 3 and dataset.channels == 3
    item = dataset[1]
    assert item.shape == (3, 16, 16)
    assert item[1].min() > 0.7 and item[0].max() < 0.1  # green everywhere, no black border left
    assert len(load_dataset("celeba", data_dir=folder, image_size=16, num_samples=2)) == 2


def _idx_bytes(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, n, rows, cols))
    return header + images.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_mnist_from_idx_files(tmp_path, compressed):
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    for i in range(5):
        images[i, 10:18, 10:18] = 50 * i
    data = _idx_bytes(images)
    if compressed:
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    else:
        (tmp_path / "train-images-idx3-ubyte").write_bytes(data)
    dataset = load_dataset("mnist", data_dir=tmp_path, image_size=32)
    assert len(dataset) == 5 and dataset.channels == 1
    item = dataset[4]
    assert item.shape == (1, 32, 32)
    torch.testing.assert_close(item[0, 2:30, 2:30], torch.from_numpy(images[4]).float() / 255)  # 2-pixel pad
    assert load_dataset("mnist", data_dir=tmp_path, image_size=28)[4].shape == (1, 28, 28)
    assert load_dataset("mnist", data_dir=tmp_path, image_size=64)[4].shape == (1, 64, 64)


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(12))
    with pytest.raises(ValueError, match="magic number 2051"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((3, 28, 28)))[:-5])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_digits_upsampled_with_a_seeded_subset():
    pytest.importorskip("sklearn")
    dataset = load_dataset("digits", image_size=32)
    assert len(dataset) == 1797 and dataset.channels == 1
    item = dataset[0]
    assert item.shape == (1, 32, 32) and 0 <= item.min() and item.max() <= 1 and item.max() > 0.5
    subset = load_dataset("digits", image_size=16, num_samples=10, seed=1)
    again = load_dataset("digits", image_size=16, num_samples=10, seed=1)
    assert len(subset) == 10
    assert torch.equal(subset.images, again.images)
    assert not torch.equal(subset.images, load_dataset("digits", image_size=16, num_samples=10, seed=2).images)


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"pip install genfast\[digits\]"):
        load_dataset("digits")


def test_bad_arguments():
    assert set(DATASETS) == {"faces", "celeba", "folder", "mnist", "digits"}
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        load_dataset("faces", num_samples=0)
    with pytest.raises(TypeError, match="image_size must be an int"):
        load_dataset("faces", image_size=64.0)
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        make_faces(2, image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_faces(0)[0].shape == (0, 3, 64, 64)


def test_digit_labels_are_aligned_with_the_images():
    pytest.importorskip("sklearn")
    from genfast.data import digit_labels

    labels = digit_labels()
    assert labels.shape == (1797,) and labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    full = load_dataset("digits", image_size=8)
    subset = load_dataset("digits", image_size=8, num_samples=10, seed=1)
    sub_labels = digit_labels(num_samples=10, seed=1)
    # each image of the subset is found in the full set under the same label
    for image, label in zip(subset.images, sub_labels):
        matches = (full.images == image).flatten(1).all(1).nonzero().flatten()
        assert matches.numel() >= 1 and (labels[matches] == label).all()
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        digit_labels(num_samples=0)
