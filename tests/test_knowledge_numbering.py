"""Each model of a knowledge analysis explains a sample's class as its own output: a Hugging Face
classifier trained elsewhere numbers the classes by its id2label, a model fine-tuned here by the
class names its run recorded. A tiny ViT built from a config, saved with save_pretrained and
loaded through the package's loader."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain_reuse import load
from pretrain_reuse.cli import main
from pretrain_reuse.models import create_backbone, save_backbone

transformers = pytest.importorskip("transformers")

# the classifier's id2label; a folder sorts them otherwise, with no class in its place
NAMES = ["b_cat", "c_dog", "a_eel"]


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                 id2label=dict(enumerate(NAMES)),
                                 label2id={n: i for i, n in enumerate(NAMES)}, initializer_range=0.5)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    for name in NAMES:
        (root / "data" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / "data" / name / f"{i}.png")
    return root


@pytest.mark.parametrize("elsewhere_role", ["pretrained", "finetuned"])
def test_knowledge_numbers_the_classes_of_each_model_as_it_does(vit, tmp_path, capsys,
                                                                elsewhere_role):
    # the classifier as trained elsewhere (its outputs named by id2label: b_cat, c_dog, a_eel)
    # and the same classifier as a run here would save it: outputs in the folder's sorted order
    # (a_eel, b_cat, c_dog), recorded as the run's class names. Per class name they are one
    # function, so all knowledge is preserved; one numbering for both was refused with a fix
    # only Python could apply (finetuned: id2label), or explained another class of the other
    # model (pretrained: id2label)
    model = f"hf:{vit / 'vit'}"
    net = create_backbone(model)
    elsewhere = save_backbone(net, tmp_path / "elsewhere.safetensors", {})
    order = [NAMES.index(name) for name in sorted(NAMES)]
    with torch.no_grad():
        net.head.weight.copy_(net.head.weight[order].clone())
        net.head.bias.copy_(net.head.bias[order].clone())
    here = save_backbone(net, tmp_path / "here.safetensors",
                         {"inputs": {"class_names": json.dumps(sorted(NAMES))}})
    weights = {"pretrained": here, "finetuned": here, elsewhere_role: elsewhere}
    rc = main(["knowledge", "--model", model, "--pretrained", str(weights["pretrained"]),
               "--finetuned", str(weights["finetuned"]), "--data", str(vit / "data"),
               "--players", "grid:2x2", "--samples", "3", "--quiet", "--out", str(tmp_path / "k")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["samples"]["n"] == 3
    assert k["report"]["overall"]["preserve"]["mean"] == 1.0
    assert k["report"]["overall"]["new"]["mean"] == 0.0
    xs = {role: [load(f) for f in sorted((tmp_path / "k" / role).glob("interactions-*"))]
          for role in ("pretrained", "finetuned")}
    own = {role: NAMES if w == elsewhere else sorted(NAMES) for role, w in weights.items()}
    for pre, ft in zip(xs["pretrained"], xs["finetuned"], strict=True):
        np.testing.assert_allclose(pre.v, ft.v, rtol=1e-5, atol=1e-5)  # one game per class name
        assert pre.info["class"] == ft.info["class"] == pre.info["sample"].split("/")[0]
        for role, x in (("pretrained", pre), ("finetuned", ft)):
            assert x.info["class"] == own[role][x.info["label"]]  # its own numbering
