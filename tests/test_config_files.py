"""YAML ``--config`` files of ``finetune`` and ``experiment``: a value of the wrong type is a
one-line error naming the key (exit 2), raised by the loader before any work or folder exists;
good files load the same values as before."""

from __future__ import annotations

import pytest

from pretrain_reuse.cli import main
from pretrain_reuse.experiments import load_experiment_config
from pretrain_reuse.finetune import FinetuneConfig, load_config

ERROR_PREFIX = "pretrain-reuse: error: "
FINETUNE = ["finetune", "--model", "smallcnn", "--target", "synthetic:target", "--max-steps", "1",
            "--quiet"]
# fig4a selects only (no training), so a bad value that slipped through would fail fast too
EXPERIMENT = ["experiment", "fig4a", "--model", "smallcnn", "--source", "synthetic:pretrain",
              "--target", "synthetic:target", "--quiet"]
EXPERIMENT_BASE = "model: smallcnn\nsource: synthetic:pretrain\ntarget: synthetic:target\n"


def one_line_error(capsys, tmp_path, argv: list[str], yaml_text: str) -> str:
    """Run the CLI with ``yaml_text`` as --config; check exit 2, one stderr line and no --out
    folder; return the line."""
    config, out = tmp_path / "c.yaml", tmp_path / "out"
    config.write_text(yaml_text)
    rc = main([*argv, "--config", str(config), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("yaml_text, needles", [
    ("epochs: one", ["'epochs'", "must be an integer", "'one'"]),
    ("epochs: 1.5", ["'epochs'", "must be an integer", "1.5"]),
    ("epochs: true", ["'epochs'", "must be an integer"]),
    ("batch_size: 3.7", ["'batch_size'", "must be an integer"]),
    ("lr: abc", ["'lr'", "must be a number", "'abc'"]),
    ("lr: 3e-3", ["'lr'", "must be a number", "write 0.003"]),  # YAML 1.1 reads it as text
    ("milestones: 5", ["'milestones'", "must be a list of numbers"]),
    ("milestones: [0.5, x]", ["'milestones'", "must be a list of numbers"]),
    ("lam: [1, 2]", ["'lam'", "must be a number"]),
    ("image_size: abc", ["'image_size'", "must be an integer or null"]),
    ("seed: null", ["'seed'", "must be an integer", "None"]),
    ("nesterov: maybe", ["'nesterov'", "must be true or false", "'maybe'"]),
    ("device: 5", ["'device'", "must be a string"]),
    ("lrr: 0.1", ["'lrr'", "did you mean 'lr'"]),
    # PyYAML keeps the last of two values without a word
    ("lr: 0.1\nlr: 0.2", ["line 2", "key 'lr' is given twice"]),
    ("milestones: [0.6, 0.6]", ["milestones must be increasing"]),
])
def test_finetune_config_value_of_the_wrong_type_is_one_line(yaml_text, needles, tmp_path, capsys):
    line = one_line_error(capsys, tmp_path, FINETUNE, yaml_text + "\n")
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.parametrize("yaml_text, needles", [
    ("seeds: zero", ["'seeds'", "must be a list of integers"]),
    ("seeds: [0, x]", ["'seeds'", "must be a list of integers"]),
    ("k: abc", ["'k'", "must be an integer"]),
    ("cluster_k: x", ["'cluster_k'", "must be a number or null"]),
    ("relevant: abc", ["relevant 'abc'", "7-24,80-100"]),
    ("relevant: [1, x]", ["'relevant'", "must be a list of integers"]),
    ("skip: vanilla", ["'skip'", "must be a list of strings"]),
    ("lam: 0.3", ["'lam'", "must be a mapping of names to numbers"]),
    ("lam: {reuse: high}", ["'lam'", "must be a mapping of names to numbers"]),
    ("lam: {resue: 0.3}", ["lam key='resue'", "did you mean 'reuse'"]),
    ("lam: {reuse: -1}", ["lam", ">= 0"]),
    ("sweep: {k: [a]}", ["'sweep'", "lists of numbers"]),
    ("finetune: 3", ["'finetune'", "must be a mapping"]),
    ("finetune: {epochs: x}", ["finetune key 'epochs'", "must be an integer"]),
    ("finetune: {seed: null}", ["finetune key 'seed'", "must be an integer"]),
    ("finetune: {lr: abc}", ["finetune key 'lr'", "must be a number"]),
    ("finetune: {lrr: 0.1}", ["finetune key='lrr'"]),
    ("explain: {n: x}", ["explain key 'n'", "must be an integer or null"]),
    ("pretrainings: {a: 5}", ["'pretrainings'", "must be a mapping of names to strings"]),
])
def test_experiment_config_value_of_the_wrong_type_is_one_line(yaml_text, needles, tmp_path,
                                                               capsys):
    line = one_line_error(capsys, tmp_path, EXPERIMENT, EXPERIMENT_BASE + yaml_text + "\n")
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.parametrize("argv", [FINETUNE, EXPERIMENT], ids=["finetune", "experiment"])
@pytest.mark.parametrize("yaml_text, needle", [
    ("epochs: 1\nlr: a: b\n", "(line 2, column 6: mapping values are not allowed here)"),
    ("lr: [0.1, 0.2\nepochs: 1\n", "(line 2, column 7: expected ',' or ']', but got ':')"),
    ('lr: "\x07"\n', "special characters are not allowed"),  # PyYAML's reader: no line/column
])
def test_yaml_syntax_error_is_one_line(argv, yaml_text, needle, tmp_path, capsys):
    line = one_line_error(capsys, tmp_path, argv, yaml_text)
    assert "is not valid YAML" in line and needle in line, line


def test_good_finetune_yaml_loads_the_values_as_written(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.01\nlam: 1\nmilestones: [0.5, 0.9]\nepochs: 5\nnesterov: false\n"
                      "image_size: null\ntrain_fraction: 0.5\nmode: reuse\n")
    cfg = load_config(config, lr=0.02, seed=None)  # a flag on top; an unset flag (None) is ignored
    assert cfg == FinetuneConfig(lr=0.02, lam=1, milestones=(0.5, 0.9), epochs=5, nesterov=False,
                                 image_size=None, train_fraction=0.5, mode="reuse")
    assert type(cfg.lam) is int  # kept as written: the saved config of a run does not change
    assert type(cfg.milestones) is tuple


def test_good_experiment_yaml_loads_the_values_as_written(tmp_path, monkeypatch):
    """The README's example, with a sweep, a skip and explain settings."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18-f37072fd.pth").write_bytes(b"")  # the weights file must exist
    config = tmp_path / "cub.yaml"
    config.write_text(
        "model: torchvision:resnet18\nweights: resnet18-f37072fd.pth\n"
        "source: /data/imagenet/train\ntarget: /data/cub/train\ntarget_test: /data/cub/test\n"
        "source_features: feats/imagenet\ntarget_features: feats/cub\nseeds: [0, 1, 2]\nk: 100\n"
        "finetune: {epochs: 100, batch_size: 256, lr: 0.003}\n"
        "lam: {reuse: 0.3, reuse-unlabeled: 0.3, co-tuning: 2.3}\n"
        "modes: {scratch: {lr: 0.1, epochs: 200}, linear-probe: {lr: 0.1, head_lr_mult: 1}}\n"
        "sweep: {k: [5, 10], eps_c: 0.1}\nskip: [co-tuning]\nexplain: {samples: 3}\n")
    cfg = load_experiment_config(config, seeds=[4], k=None)  # --seeds 4; --k unset
    assert cfg.seeds == (4,) and cfg.k == 100 and cfg.weights == "resnet18-f37072fd.pth"
    assert cfg.finetune == {"epochs": 100, "batch_size": 256, "lr": 0.003}
    assert cfg.lam == {"reuse": 0.3, "reuse-unlabeled": 0.3, "co-tuning": 2.3}
    assert cfg.modes == {"scratch": {"lr": 0.1, "epochs": 200},
                         "linear-probe": {"lr": 0.1, "head_lr_mult": 1}}
    assert cfg.mode_finetune("scratch").epochs == 200 and cfg.mode_finetune("vanilla").epochs == 100
    assert cfg.sweep == {"k": (5, 10), "eps_c": (0.1,)} and cfg.skip == ("co-tuning",)
    assert cfg.base_finetune() == FinetuneConfig(epochs=100, batch_size=256, lr=0.003)
    assert cfg.explain_config().samples == 3


def test_relevant_in_yaml_takes_the_range_syntax_of_the_flag(tmp_path):
    config = tmp_path / "c.yaml"
    expected = (*range(56, 64), *range(112, 120))
    config.write_text(EXPERIMENT_BASE + "relevant: 56-63,112-119\n")
    assert load_experiment_config(config).relevant == expected
    config.write_text(EXPERIMENT_BASE + f"relevant: {list(expected)}\n")
    assert load_experiment_config(config).relevant == expected


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir(), "is a folder; pass a file"),
    (lambda p: p.write_bytes(bytes(range(128, 256))), "is not a text file"),
])
def test_config_that_is_a_folder_or_binary_is_one_line(make, needle, tmp_path, capsys):
    bad = tmp_path / "recipe.yaml"
    make(bad)
    rc = main(["finetune", "--model", "smallcnn", "--target", "synthetic:target", "--config",
               str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "run").exists()
