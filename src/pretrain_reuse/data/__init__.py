"""Data: datasets (image folders, file lists, arrays), samplers, and embedded data sets by name.

- :mod:`.datasets` -- :class:`ImageDataset` and its sources, decoding, batching that skips
  unreadable images;
- :mod:`.samplers` -- low-data and long-tail subsets of a training set;
- :mod:`.world` -- the procedural image world with known AND/OR part rules;
- :mod:`.real` -- real images shipped by packages (Fashion-MNIST, MNIST-5k, digits, ImageNet
  samples, scikit-image photos);
- :mod:`.catalog` -- :data:`DATASETS`, :func:`list_datasets` and :func:`open_dataset`;
- :mod:`.synthetic` -- the planted feature-space world used by the selection tests.
"""

from .catalog import DATASETS, DatasetSpec, list_datasets, open_dataset
from .datasets import (
    ArrayDataset,
    Batch,
    DataWarning,
    FileDataset,
    ImageDataset,
    SubsetDataset,
    collate,
    describe_skipped,
    file_list,
    image_folder,
    make_loader,
    read_class_names,
    write_class_names,
)
from .samplers import Subsample, subsample_fraction, subsample_long_tail
from .world import Rule, Scene, World, WorldConfig, WorldDataset, make_world

__all__ = [
    "DATASETS", "ArrayDataset", "Batch", "DataWarning", "DatasetSpec", "FileDataset", "ImageDataset",
    "Rule", "Scene", "Subsample", "SubsetDataset", "World", "WorldConfig", "WorldDataset", "collate",
    "describe_skipped", "file_list", "image_folder", "list_datasets", "make_loader", "make_world",
    "open_dataset", "read_class_names", "subsample_fraction", "subsample_long_tail",
    "write_class_names",
]
