"""Backbones by name: registry, feature layers, preprocessing and checkpoint I/O.

>>> from pretrain_reuse.models import create_backbone
>>> net = create_backbone("torchvision:resnet18", weights="resnet18-f37072fd.pth")  # doctest: +SKIP
>>> net.feature_dim, net.spec.resize_size, net.spec.input_size  # doctest: +SKIP
(512, 256, (224, 224))
>>> x = net.preprocess(pil_image).unsqueeze(0)  # doctest: +SKIP
>>> net.features(x).shape  # doctest: +SKIP
torch.Size([1, 512])

MoCo-v2 (the paper's self-supervised features, 128-d output of the MLP head before its L2 norm):
``create_backbone("torchvision:resnet50", weights="moco_v2_800ep_pretrain.pth.tar", layer="head")``.
"""

from .backbone import LAYERS, Backbone
from .checkpoint import (
    LoadReport,
    WeightsWarning,
    features_hash,
    finetune_mode,
    model_class_names,
    output_class_names,
    save_backbone,
    state_hash,
    trained_class_names,
    weights_meta,
    weights_path,
)
from .registry import BACKBONES, create_backbone, list_backbones, missing_packages
from .smallcnn import SmallCNN
from .spec import BackboneSpec, ImageTransform, TextTransform

__all__ = [
    "BACKBONES",
    "LAYERS",
    "Backbone",
    "BackboneSpec",
    "ImageTransform",
    "LoadReport",
    "SmallCNN",
    "TextTransform",
    "WeightsWarning",
    "create_backbone",
    "features_hash",
    "finetune_mode",
    "list_backbones",
    "missing_packages",
    "model_class_names",
    "output_class_names",
    "save_backbone",
    "state_hash",
    "trained_class_names",
    "weights_meta",
    "weights_path",
]
