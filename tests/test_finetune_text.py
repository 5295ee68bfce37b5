"""Fine-tuning a text model: a tiny BERT (built from a config and a local vocabulary, saved with
save_pretrained and loaded through the package's loader) on .jsonl sentence files whose topic
words decide the class. One optimiser step is checked against the same step written out by
hand, gradient accumulation against the full batch, a resumed run bitwise against an
uninterrupted one, and the whole chain (embed, units, select, finetune reuse, evaluate) through
the command line."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from _helpers import tiny_bert, torchrun
from pretrain_reuse.cli import main
from pretrain_reuse.data.text import text_file
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.finetune import FinetuneConfig, train
from pretrain_reuse.finetune.config import lr_at
from pretrain_reuse.finetune.data import SourceData, StepBatches
from pretrain_reuse.finetune.model import FinetuneModel
from pretrain_reuse.models import create_backbone

pytest.importorskip("transformers")

FILLERS = ["the", "a", "was", "is", "and", "but", "not", "very", "quite", "so"]
TOPICS = {"bird": "wing beak feather", "car": "wheel engine brake", "fruit": "apple pear plum",
          "rock": "stone granite basalt", "sea": "wave tide salt"}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLERS, *" ".join(TOPICS.values()).split()]
TARGET = ("fruit", "rock")  # the target's classes; the pool holds them and three others


def _sentences(path, topics, n, seed, labelled=True):
    """``n`` sentences per topic: six filler words and two of the topic's words, shuffled, of
    varying length (so batches are padded)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for topic in topics:
            for _ in range(n):
                words = [*rng.choice(FILLERS, rng.integers(2, 7)), *rng.choice(TOPICS[topic].split(), 2)]
                rng.shuffle(words)
                row = {"label": topic, "text": " ".join(words)} if labelled else {"text": " ".join(words)}
                fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"bert": tiny_bert(root / "bert", WORDS),
            "quiet_bert": tiny_bert(root / "quiet-bert", WORDS, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0),
            "train": _sentences(root / "train.jsonl", TARGET, 20, seed=0),
            "test": _sentences(root / "test.jsonl", TARGET, 15, seed=1),
            "pool": _sentences(root / "pool.jsonl", TOPICS, 24, seed=2)}


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_ok(capsys, *argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    return out


def _datasets(files, model):
    """Training, validation and test sentences tokenized by ``model``, and the pool's sentences
    of the target's two topics as labelled source data (source head over them, in order)."""
    train_set, test_set = text_file(files["train"]), text_file(files["test"])
    pool = text_file(files["pool"])
    chosen = [pool.class_names.index(t) for t in TARGET]
    idx = np.flatnonzero(np.isin(pool.labels, chosen))
    source = SourceData(pool.subset(idx), np.searchsorted(chosen, pool.labels[idx]),
                        pool.labels[idx], len(chosen))
    for d in (train_set, test_set, source.dataset):
        d.transform = model.backbone.preprocess
    return train_set, test_set.subset(range(4)), test_set, source


def _model(bert, mode="vanilla"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = create_backbone(f"hf:{bert}")
    return FinetuneModel(backbone, 2, source_classes=2 if mode == "reuse" else None, seed=0)


def test_one_reuse_step_on_sentences_equals_the_step_written_out(files, tmp_path):
    cfg = FinetuneConfig(mode="reuse", max_steps=1, batch_size=8, lr=0.05, lam=0.7,
                         eval_every=10**6, seed=3)
    model = _model(files["quiet_bert"], "reuse")
    reference = _model(files["quiet_bert"], "reuse")
    train_set, val_set, test_set, source = _datasets(files, model)
    train(cfg, model, train_set, val_set, test_set, source, tmp_path / "run", progress=False)

    # by hand: the step's target and source sentences, tokenized apart, one loss, one SGD step
    t = StepBatches(len(train_set), 8, cfg.seed, stream=0).batch(0)
    s = StepBatches(len(source.dataset), 8, cfg.seed, stream=1).batch(0)
    tok = reference.backbone.preprocess.tokenizer

    def features(texts):
        return reference.backbone.features(dict(tok(texts, padding=True, return_tensors="pt")))

    loss = (F.cross_entropy(reference.head(features([train_set.texts[i] for i in t])),
                            torch.as_tensor(train_set.labels[t]))
            + 0.7 * F.cross_entropy(reference.source_head(features([source.dataset.texts[i] for i in s])),
                                    torch.as_tensor(source.labels[s])))
    loss.backward()
    factor = lr_at(0, 1, cfg)
    groups = reference.param_groups(cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    for g in groups:
        g["lr"] = g["base_lr"] * factor
    torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov).step()

    trained = dict(model.named_parameters())
    initial = dict(_model(files["quiet_bert"], "reuse").named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(trained[name], p, atol=1e-6, rtol=1e-5, msg=name)
    # the step changed the weights: the comparison is not of two copies of the start
    assert max((p - initial[name]).abs().max().item() for name, p in trained.items()) > 1e-3


def test_gradient_accumulation_on_padded_sentences_equals_the_full_batch(files, tmp_path):
    # no BatchNorm in a text model: splitting the batch only reorders the sums
    weights = []
    for accum in (1, 3):
        cfg = FinetuneConfig(max_steps=2, batch_size=9, lr=0.05, eval_every=10**6,
                             grad_accum=accum)
        model = _model(files["quiet_bert"])
        train(cfg, model, *_datasets(files, model)[:3], None, tmp_path / f"a{accum}", progress=False)
        weights.append(load_file(str(tmp_path / f"a{accum}" / "model.safetensors")))
    for k in weights[0]:
        np.testing.assert_allclose(weights[0][k].numpy(), weights[1][k].numpy(), atol=2e-6, rtol=0)


def test_a_run_stopped_after_a_checkpoint_resumes_bit_identical_dropout_included(files, tmp_path):
    cfg = FinetuneConfig(mode="reuse", max_steps=6, batch_size=8, lr=0.05, eval_every=1,
                         checkpoint_every=2, seed=1)

    def fit(out, crash_after=None):
        model = _model(files["bert"], "reuse")  # dropout 0.1: the masks must replay
        steps = []

        def hook(*_):
            steps.append(1)
            if len(steps) == crash_after:
                raise RuntimeError("crash")
        handle = register_optimizer_step_post_hook(hook)
        try:
            return train(cfg, model, *_datasets(files, model), out, progress=False)
        finally:
            handle.remove()

    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "run", crash_after=3)  # after the checkpoint of step 2
    resumed, reference = fit(tmp_path / "run"), fit(tmp_path / "reference")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("run", "reference"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == reference.history


def test_the_cli_chain_selects_the_related_topics_and_fine_tunes_on_them(files, tmp_path, capsys):
    """embed -> units -> select -> finetune reuse -> evaluate, on sentence files."""
    bert = f"hf:{files['bert']}"
    for name, data in (("pool", files["pool"]), ("target", files["train"])):
        run_ok(capsys, "embed", "--model", bert, "--data", data, "--out", tmp_path / name, "--quiet")
        run_ok(capsys, "units", "--features", tmp_path / name, "--out",
               tmp_path / f"{name}.safetensors", "--quiet")
    run_ok(capsys, "select", "--source", tmp_path / "pool.safetensors", "--target",
           tmp_path / "target.safetensors", "--k", 2, "--out", tmp_path / "sel.json", "--quiet")
    selection = json.loads((tmp_path / "sel.json").read_text())
    # planted: the pool's topics of the target's classes share their words
    assert sorted(selection["selected"]) == [list(TOPICS).index(t) for t in TARGET]

    out = tmp_path / "reuse"
    args = ["finetune", "--model", bert, "--mode", "reuse", "--target", files["train"],
            "--target-test", files["test"], "--source", files["pool"], "--selection",
            tmp_path / "sel.json", "--out", out, "--max-steps", 80, "--batch-size", 8, "--lr", 0.02,
            "--quiet"]
    printed = run_ok(capsys, *args)
    result = json.loads((out / "result.json").read_text())
    assert "ce_source" in result["history"][-1]
    assert result["final"]["top1"] >= 0.9  # the topic words decide the class
    assert f"test top-1 {result['final']['top1']:.4f}" in printed
    # the saved classifier, loaded again by evaluate, scores the test sentences as the run did
    printed = run_ok(capsys, "evaluate", "--model", bert, "--weights", out / "model.safetensors",
                     "--data", files["test"])
    assert printed.startswith(f"top-1 {result['final']['top1']:.4f}, ")
    assert "on 30 sentences" in printed
    # a rerun of the finished run trains nothing and changes nothing
    before = (out / "model.safetensors").read_bytes()
    run_ok(capsys, *args)
    assert (out / "model.safetensors").read_bytes() == before


def test_reuse_of_sentence_clusters_is_one_line_naming_class_units(files, tmp_path, capsys):
    # clusters have no labels for the source head; reuse-unlabeled, which takes clusters, needs
    # augmentations of images
    bert = f"hf:{files['bert']}"
    for name, data in (("pool", files["pool"]), ("target", files["train"])):
        run_ok(capsys, "embed", "--model", bert, "--data", data, "--out", tmp_path / name, "--quiet")
    clusters = tmp_path / "clusters.safetensors"
    run_ok(capsys, "units", "--features", tmp_path / "pool", "--method", "kmeans", "--k", 5,
           "--out", clusters, "--quiet")
    run_ok(capsys, "units", "--features", tmp_path / "target", "--out",
           tmp_path / "target.safetensors", "--quiet")
    run_ok(capsys, "select", "--source", clusters, "--target", tmp_path / "target.safetensors",
           "--k", 2, "--out", tmp_path / "sel.json", "--quiet")
    rc, _, err = run(capsys, "finetune", "--model", bert, "--mode", "reuse", "--target",
                     files["train"], "--target-test", files["test"], "--source", files["pool"],
                     "--selection", tmp_path / "sel.json", "--units", clusters, "--batch-size", 8,
                     "--out", tmp_path / "run", "--quiet")
    assert rc == 2 and ("mode 'reuse' needs labelled source units; for sentences, select class "
                        "units of a labelled pool (units of its features with labels)") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--mode", "reuse-unlabeled", "--source", "POOL", "--selection", "SEL"],
     "mode 'reuse-unlabeled' trains on weak and strong augmentations of images"),
    # said before an unlabelled pool was refused for lacking labels (the fix it named, adding
    # labels, led to this refusal)
    (["--mode", "reuse-unlabeled", "--source", "UNLABELLED", "--selection", "SEL"],
     "mode 'reuse-unlabeled' trains on weak and strong augmentations of images"),
    (["--image-size", "32"], "image_size applies to images, not to the sentences"),
    (["--augment", "flip"], "augment applies to images, not to the sentences"),
    (["--mode", "reuse", "--source", "POOL", "--selection", "SEL", "--source-bn", "target"],
     "source_bn applies to images, not to the sentences"),
    (["--model", "smallcnn"], "smallcnn is an image model but --target holds sentences"),
    (["--target-test", "synthetic:target-0"], "is a text model but --target-test is no sentence file"),
])
def test_what_sentences_cannot_take_is_one_line(files, tmp_path, capsys, extra, needle):
    (tmp_path / "sel.json").write_text(json.dumps({"kind": "selection", "selected": [2, 3],
                                                   "scores": [0, 0, 1, 1, 0], "params": {},
                                                   "meta": {}}))
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n"
                                  for line in files["pool"].read_text().splitlines()))
    extra = [str(files["pool"]) if a == "POOL" else str(tmp_path / "sel.json") if a == "SEL"
             else str(unlabelled) if a == "UNLABELLED" else a for a in extra]
    args = {"--model": f"hf:{files['bert']}", "--target": str(files["train"]),
            "--target-test": str(files["test"]), "--out": str(tmp_path / "run")}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = value
    rc, _, err = run(capsys, "finetune", *[x for kv in args.items() for x in kv], "--quiet")
    assert rc == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, data, needle", [
    ("bert", ["--target", "synthetic:target"], "is a text model but --target is no sentence file"),
    ("smallcnn", ["--target", "TRAIN", "--target-test", "TEST"],
     "smallcnn is an image model but --target holds sentences"),
    ("smalcnn", ["--target", "synthetic:target"], "model='smalcnn' is not one of"),
    ("timn:resnet18", ["--target", "synthetic:target"], "model prefix='timn' is not one of")])
def test_a_model_of_the_other_modality_is_refused_before_the_data_is_read(
        files, tmp_path, capsys, monkeypatch, model, data, needle):
    # listing a large image folder took long, and only then was the model's modality compared
    def unread(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr("pretrain_reuse.finetune.run.open_dataset", unread)
    monkeypatch.setattr("pretrain_reuse.finetune.run.text_file", unread)
    model = f"hf:{files['bert']}" if model == "bert" else model
    data = [str(files["train"]) if a == "TRAIN" else str(files["test"]) if a == "TEST" else a
            for a in data]
    rc, _, err = run(capsys, "finetune", "--model", model, *data, "--out", tmp_path / "run")
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_sentence_file_without_test_data_names_the_missing_flag(files, tmp_path, capsys):
    rc, _, err = run(capsys, "finetune", "--model", f"hf:{files['bert']}", "--target",
                     files["train"], "--out", tmp_path / "run")
    assert rc == 2 and "pass --target-test" in err and ".jsonl" in err


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """hf:<folder> of a 5-class BertForSequenceClassification: its head is a source classifier."""
    return tiny_bert(tmp_path_factory.mktemp("bert-cls"), WORDS, "BertForSequenceClassification",
                     num_labels=5)


def test_cotuning_relates_the_classes_by_the_classifiers_own_predictions_on_sentences(files, classifier):
    import transformers

    from pretrain_reuse.finetune.run import _attach_relationship

    net = FinetuneModel(create_backbone(f"hf:{classifier}"), 2, seed=0)
    train_set, val_set, _, _ = _datasets(files, net)
    _attach_relationship(net, train_set, val_set,
                         FinetuneConfig(mode="co-tuning", cotuning_relationship="direct"), 2)
    # the reference: transformers' own classifier on the training sentences, mean softmax per class
    tok = transformers.AutoTokenizer.from_pretrained(classifier, local_files_only=True)
    ref = transformers.BertForSequenceClassification.from_pretrained(classifier, local_files_only=True)
    with torch.no_grad():
        probs = ref.eval()(**tok(train_set.texts, padding=True, return_tensors="pt")).logits.softmax(1)
    expected = torch.stack([probs[torch.as_tensor(train_set.labels) == c].mean(0) for c in (0, 1)])
    torch.testing.assert_close(net.relationship, expected, atol=1e-5, rtol=1e-5)


def test_a_linear_probe_on_sentences_trains_the_head_alone(files, classifier, tmp_path, capsys):
    model = f"hf:{classifier}"
    run_ok(capsys, "finetune", "--model", model, "--mode", "linear-probe", "--target",
           files["train"], "--target-test", files["test"], "--out", tmp_path / "lp",
           "--max-steps", 5, "--batch-size", 8, "--lr", 0.05, "--quiet")
    before = create_backbone(model).state_dict()
    after = create_backbone(model, weights=tmp_path / "lp" / "model.safetensors").state_dict()
    body = [k for k in before if k.startswith("body.")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    assert after["head.weight"].shape == (2, 16)  # the new 2-class head, trained in place of the 5-class one


def _experiment(capsys, name, files, model, out, *extra):
    return run(capsys, "experiment", name, "--model", model, "--source", files["pool"],
               "--target", files["train"], "--target-test", files["test"], "--k", 2,
               "--clusters", 5, "--seeds", 0, "--out", out, *extra)


def test_table1_on_sentences_leaves_unlabelled_reuse_out_and_runs_the_rest(files, classifier,
                                                                           tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text("finetune:\n  max_steps: 4\n  batch_size: 8\n"
                      "skip: [reuse random classes, reuse greedy-ot classes]\n")
    rc, printed, err = _experiment(capsys, "table1", files, f"hf:{classifier}", tmp_path / "exp",
                                   "--config", config)
    assert rc == 0, err
    assert ("left out on sentences (reuse-unlabeled needs augmentations of images): "
            "reuse-unlabeled random clusters, reuse-unlabeled greedy-ot clusters, "
            "reuse-unlabeled uot clusters") in printed
    rows = json.loads((tmp_path / "exp" / "experiment.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["vanilla", "co-tuning", "reuse uot classes"]
    for row, folder in zip(rows, ("vanilla-seed0", "co-tuning-seed0", "reuse-uot-classes-seed0"),
                           strict=True):
        result = json.loads((tmp_path / "exp" / "runs" / folder / "result.json").read_text())
        assert row["top1_mean"] == result["final"]["top1"]
    assert rows[2]["units"] == 2


def test_an_experiment_on_sentences_edited_since_it_embedded_them_is_refused(files, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(files["pool"].read_text())
    argv = ["experiment", "fig4a", "--model", f"hf:{files['bert']}", "--source", pool, "--target",
            files["train"], "--k", 2, "--relevant", "0,1", "--quiet", "--out", tmp_path / "exp"]
    run_ok(capsys, *argv)
    text = pool.read_text()
    pool.write_text(text.replace("apple", "granite"))  # the same lines, other words
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and (f"source {str(pool)!r} changed since this experiment embedded it (the same "
                        "lines, other sentences); its selections and runs were made") in err, err
    # relabelled in place: the features were reused, and the class means of the labels as they were
    pool.write_text(text.replace('"label": "bird"', '"label": "car"', 1))
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "changed since this experiment embedded it (the same samples, other labels)" in err
    pool.write_text(text)
    run_ok(capsys, *argv)  # restored: resumed


def test_explaining_an_encoder_is_one_error_without_a_note_before_it(files, tmp_path, capsys):
    # a note that 3 of the 40 samples were explainable came first, then the error that the
    # model is no classifier: the note spoke of a run that never started
    rc, _, err = run(capsys, "explain", "--model", f"hf:{files['bert']}", "--data", files["train"],
                     "--players", "tokens", "--n", 4, "--samples", 100, "--out", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1 and "the model must be a classifier" in err, err


def test_cotuning_on_a_base_model_folder_names_a_classifier_folder(files, tmp_path, capsys):
    # a BertModel folder has no classifier: the fix is a *ForSequenceClassification folder as
    # --model, whose head is the source classifier, not --weights
    rc, _, err = run(capsys, "finetune", "--mode", "co-tuning", "--model", f"hf:{files['bert']}",
                     "--target", files["train"], "--target-test", files["test"], "--batch-size", 8,
                     "--max-steps", 1, "--quiet", "--out", tmp_path / "run")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert (f"hf:{files['bert']} has none; pass as --model the folder of a Hugging Face "
            "*ForSequenceClassification model (its classifier is the source head)") in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, model, needle", [
    ("table2", "classifier", "table2 fine-tunes with reuse-unlabeled only, whose soft targets come "
                             "from weak and strong augmentations of images"),
    ("table1", "bert", "has none; pass as --model the folder of a Hugging Face "
                       "*ForSequenceClassification model (its classifier is the source head), or "
                       "leave the row out (skip: [co-tuning] in --config)"),
    ("table4", "smallcnn", "smallcnn is an image model but the target data holds sentences"),
])
def test_an_experiment_sentences_cannot_run_is_refused_before_anything_is_written(
        files, classifier, tmp_path, capsys, name, model, needle):
    model = {"classifier": f"hf:{classifier}", "bert": f"hf:{files['bert']}"}.get(model, model)
    config = tmp_path / "exp.yaml"
    config.write_text("finetune:\n  max_steps: 4\n  batch_size: 8\n")
    rc, _, err = _experiment(capsys, name, files, model, tmp_path / "exp", "--config", config,
                             "--quiet")
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "exp").exists()


def test_an_experiment_of_an_image_model_on_sentences_says_only_the_refusal(files, tmp_path, capsys):
    # the note of the rows left out on sentences came first, for a run that never started
    rc, out, err = _experiment(capsys, "table1", files, "smallcnn", tmp_path / "exp")
    assert rc == 2 and "smallcnn is an image model but the target data holds sentences" in err
    assert "left out" not in out and not (tmp_path / "exp").exists()


def test_an_experiment_refuses_a_model_of_the_other_modality_before_reading_the_data(
        files, tmp_path, capsys, monkeypatch):
    def unread(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr("pretrain_reuse.experiments.workspace.open_split", unread)
    rc, _, err = run(capsys, "experiment", "table1", "--model", f"hf:{files['bert']}", "--source",
                     "synthetic:pretrain", "--target", "synthetic:target", "--out",
                     tmp_path / "exp", "--quiet")
    assert rc == 2 and "is a text model but the target data is no sentence file" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "exp").exists()


def test_torchrun_two_processes_on_sentences_match_one_process(files, tmp_path, capsys):
    # a text model normalises each sentence alone (LayerNorm, dropout off here), so two ranks'
    # half-batches average to the full batch's gradient up to float summation order; BERT's
    # pooler, unused by the pooled features, must not stop DDP (it waited for its gradients)

    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"kind": "selection", "selected": [2, 3],
                                     "scores": [0, 0, 1, 1, 0], "params": {}, "meta": {}}))
    args = ["--model", f"hf:{files['quiet_bert']}", "--mode", "reuse", "--target", files["train"],
            "--target-test", files["test"], "--source", files["pool"], "--selection", selection,
            "--max-steps", 6, "--batch-size", 8, "--lr", 0.02, "--quiet"]
    args = [str(a) for a in args]
    proc = torchrun(["-m", "pretrain_reuse", "finetune", *args, "--out", tmp_path / "two"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_ok(capsys, "finetune", *args, "--out", tmp_path / "one")
    two, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("two", "one"))
    for k in one:
        np.testing.assert_allclose(two[k].numpy(), one[k].numpy(), atol=1e-6, rtol=0)
    model = f"hf:{files['quiet_bert']}"
    start = create_backbone(model).state_dict()
    trained = create_backbone(model, weights=tmp_path / "one" / "model.safetensors").state_dict()
    assert any(k.startswith("body.") and not torch.equal(start[k], trained[k]) for k in start)


def test_knowledge_compares_text_models_fine_tuned_here(files, tmp_path, capsys):
    """The README's text chain ends in `knowledge --players tokens` on finetune's own runs."""
    model = f"hf:{files['bert']}"
    runs = {}
    for mode in ("linear-probe", "vanilla", "scratch"):
        runs[mode] = tmp_path / mode
        run_ok(capsys, "finetune", "--model", model, "--mode", mode, "--target", files["train"],
               "--target-test", files["test"], "--out", runs[mode], "--max-steps", 60,
               "--batch-size", 8, "--lr", 0.02, "--quiet")
    printed = run_ok(capsys, "knowledge", "--model", model,
                     "--pretrained", runs["linear-probe"] / "model.safetensors",
                     "--finetuned", runs["vanilla"] / "model.safetensors",
                     "--scratch", runs["scratch"] / "model.safetensors", "--data", files["test"],
                     "--players", "tokens", "--n", 2, "--samples", 3, "--out", tmp_path / "k",
                     "--quiet")
    report = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert printed.startswith("knowledge over ") and (tmp_path / "k" / "ratios.png").exists()
    # each explained sentence is one every model classifies correctly, as the analysis promises
    models = {m: create_backbone(model, weights=runs[m] / "model.safetensors")
              for m in ("linear-probe", "vanilla", "scratch")}
    data = text_file(files["test"])
    ids = report["samples"]["ids"]
    assert len(ids) == report["samples"]["n"] == 3
    for sid in ids:
        i = data.ids.index(sid)
        tokens = dict(models["vanilla"].preprocess.batch([data.texts[i]]))
        for m in models.values():
            with torch.no_grad():
                assert int(m.eval()(tokens).argmax()) == int(data.labels[i])


# --------------------------------------------------------------------------------------------
# Other tokenizers and architectures (a review's findings)
# --------------------------------------------------------------------------------------------


def _tiny_gpt2(folder, *, classifier=False, pad=True):
    """hf:<folder> of a tiny GPT-2 (its Conv1D layers, positions numbered from the first
    column whatever the mask) with a word-level tokenizer that pads on the LEFT, as decoder
    tokenizers often do."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", padding_side="left",
        model_input_names=["input_ids", "attention_mask"], **({"pad_token": "[PAD]"} if pad else {}))
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=16, n_layer=2, n_head=2,
                                  n_positions=64, num_labels=2, **({"pad_token_id": 0} if pad else {}))
    torch.manual_seed(0)
    cls = transformers.GPT2ForSequenceClassification if classifier else transformers.GPT2Model
    cls(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_left_padding_tokenizer_gives_each_sentence_its_own_features_in_any_batch(files, tmp_path):
    # GPT-2 numbers positions from the first column: left padding shifted every sentence by its
    # batch's padding, so accuracy depended on the batch size
    for classifier in (False, True):
        model = create_backbone(f"hf:{_tiny_gpt2(tmp_path / str(classifier), classifier=classifier)}")
        texts = text_file(files["test"]).texts[:6]
        with torch.no_grad():
            alone = torch.cat([model(model.preprocess.batch([t])) for t in texts])
            together = model(model.preprocess.batch(texts))
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_scratch_resets_a_hugging_face_model_by_its_own_scheme(tmp_path):
    from pretrain_reuse.finetune.model import reinitialize

    model = f"hf:{_tiny_gpt2(tmp_path / 'gpt2')}"
    loaded = create_backbone(model).state_dict()
    reset = reinitialize(create_backbone(model), seed=5).state_dict()
    matrices = [k for k in loaded if loaded[k].dim() >= 2]  # Conv1D, embeddings
    assert any("c_attn" in k for k in matrices)
    for k in matrices:  # every one redrawn, at GPT-2's initializer_range 0.02 (not N(0, 1))
        assert not torch.equal(reset[k], loaded[k]), k
        assert 0.005 < reset[k].float().std().item() < 0.03, k
    again = reinitialize(create_backbone(model), seed=5).state_dict()
    assert all(torch.equal(again[k], reset[k]) for k in reset)  # seeded


def test_a_tokenizer_without_a_padding_token_is_one_line_before_anything_is_written(files,
                                                                                    tmp_path, capsys):
    model = f"hf:{_tiny_gpt2(tmp_path / 'gpt2', pad=False)}"
    rc, _, err = run(capsys, "finetune", "--model", model, "--target", files["train"],
                     "--target-test", files["test"], "--out", tmp_path / "run")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "has no padding token, which batches of sentences need" in err
    assert not (tmp_path / "run").exists()


def test_a_rerun_after_the_sentences_changed_is_refused(files, tmp_path, capsys):
    target = tmp_path / "train.jsonl"
    target.write_text(files["train"].read_text())
    args = ["finetune", "--model", f"hf:{files['bert']}", "--target", target, "--target-test",
            files["test"], "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 8, "--quiet"]
    run_ok(capsys, *args)
    embed = ["embed", "--model", f"hf:{files['bert']}", "--data", target, "--out", tmp_path / "f",
             "--quiet"]
    run_ok(capsys, *embed)
    explain = ["explain", "--model", f"hf:{files['bert']}", "--weights", tmp_path / "run" /
               "model.safetensors", "--data", target, "--players", "tokens", "--n", 3,
               "--samples", 1, "--quiet", "--out", tmp_path / "x"]
    run_ok(capsys, *explain)
    # same ids (file:line) and labels, other words
    original = target.read_text()
    target.write_text(original.replace("apple", "granite"))
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "holds a run with a different input (data: the sample ids or labels (or " \
                       "sentences)" in err
    # embed and explain kept their results of the old sentences ("finished; nothing to do")
    rc, _, err = run(capsys, *embed)
    assert rc == 2 and "holds an embedding made with other settings or inputs (texts); rerun " \
                       "with the same settings and inputs to resume" in err, err
    rc, _, err = run(capsys, *explain)
    assert rc == 2 and "made with other settings or inputs (texts: \"sha256:" in err, err
    # the same sentences, another label
    first = json.loads(original.splitlines()[0])["label"]
    other = next(json.loads(line)["label"] for line in original.splitlines()
                 if json.loads(line)["label"] != first)
    lines = original.splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "label": other})
    target.write_text("\n".join(lines) + "\n")
    rc, _, err = run(capsys, *embed)
    assert rc == 2 and "holds an embedding made with other settings or inputs (labels)" in err, err
    # an explanation of an earlier version, which recorded neither sentences nor labels, is taken
    # as made of the data as it is, as that version took it: its rerun has nothing to do
    target.write_text(original)
    marker = tmp_path / "x" / "explain.json"
    recorded = json.loads(marker.read_text())
    identity = {k: v for k, v in recorded["identity"].items() if k not in ("texts", "labels")}
    marker.write_text(json.dumps({**recorded, "identity": identity}))
    assert "is finished (same settings); nothing to do" in run_ok(capsys, *explain)


def test_a_selection_made_for_another_target_is_warned_of_once(files, tmp_path, capsys):
    # a selection ranks the pool for one target; reused with other target data it was taken
    # without a word (a warning, not a refusal: reusing it can be deliberate)
    bert = f"hf:{files['bert']}"
    other = _sentences(tmp_path / "other.jsonl", ("bird", "car", "sea"), 10, seed=3)
    other_test = _sentences(tmp_path / "other-test.jsonl", ("bird", "car", "sea"), 4, seed=4)
    for name, data in (("pool", files["pool"]), ("target", files["train"])):
        run_ok(capsys, "embed", "--model", bert, "--data", data, "--out", tmp_path / name, "--quiet")
    run_ok(capsys, "select", "--source", tmp_path / "pool", "--target", tmp_path / "target",
           "--k", 2, "--out", tmp_path / "sel.json", "--quiet")

    def finetune(target, test, out, *extra):
        return run(capsys, "finetune", "--model", bert, "--mode", "reuse", "--target", target,
                   "--target-test", test, "--source", files["pool"], "--selection",
                   tmp_path / "sel.json", "--out", tmp_path / out, "--max-steps", 1,
                   "--batch-size", 8, "--quiet", *extra)

    rc, _, err = finetune(files["train"], files["test"], "same")
    assert rc == 0 and "warning:" not in err, err
    # once, also for a grid of runs, each checked before the first is run
    rc, _, err = finetune(other, other_test, "other", "--grid", "lr=0.01,0.02")
    assert rc == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1, err
    assert warned[0].startswith(
        f"warning: selection for another target: the selection ({str(tmp_path / 'sel.json')!r}) "
        f"was made for the 40 samples of {str(files['train'].resolve())!r} (ids sha256:")
    assert f"--target {str(other)!r} has 30 samples of {str(other.resolve())!r}" in warned[0]
    assert "select for this target" in warned[0]
    # the filter the warning names (PYTHONWARNINGS='ignore:selection for another target')
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="selection for another target")
        rc, _, err = finetune(other, other_test, "silenced")
    assert rc == 0 and "warning:" not in err, err


def test_test_sentences_that_are_training_sentences_are_warned_of(files, tmp_path, capsys):
    printed = run(capsys, "finetune", "--model", f"hf:{files['bert']}", "--target", files["train"],
                  "--target-test", files["train"], "--out", tmp_path / "run", "--max-steps", 2,
                  "--batch-size", 8, "--quiet")
    assert printed[0] == 0, printed[2]
    assert "40 of the 40 test sentences are training sentences too (the same text" in printed[2]


def test_named_classes_on_one_side_only_are_noted(files, tmp_path, capsys):
    numbered = tmp_path / "numbered.jsonl"
    numbered.write_text("".join(
        json.dumps({"label": TARGET.index(row["label"]), "text": row["text"]}) + "\n"
        for row in map(json.loads, files["train"].read_text().splitlines())))
    rc, _, err = run(capsys, "finetune", "--model", f"hf:{files['bert']}", "--target", numbered,
                     "--target-test", files["test"], "--out", tmp_path / "run", "--max-steps", 2,
                     "--batch-size", 8)
    assert rc == 0, err
    assert ("note: the test data names its classes and the training data does not (integer "
            "labels), so the test data's class i is taken as label i") in err


def test_csv_sentence_files_fine_tune_to_the_weights_of_the_same_jsonl_files(files, tmp_path, capsys):
    def as_csv(path):
        out = tmp_path / f"{path.stem}.csv"
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label", "id"])  # the .jsonl's default ids: the same split
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                writer.writerow([json.loads(line)["text"], json.loads(line)["label"],
                                 f"{path.name}:{number}"])
        return out

    weights = []
    for train_file, test_file in ((files["train"], files["test"]),
                                  (as_csv(files["train"]), as_csv(files["test"]))):
        out = tmp_path / train_file.suffix[1:]
        run_ok(capsys, "finetune", "--model", f"hf:{files['bert']}", "--target", train_file,
               "--target-test", test_file, "--out", out, "--max-steps", 3, "--batch-size", 8,
               "--quiet")
        weights.append(load_file(out / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_augment_none_is_what_sentences_get_and_is_accepted(files, tmp_path, capsys):
    run_ok(capsys, "finetune", "--model", f"hf:{files['bert']}", "--target", files["train"],
           "--target-test", files["test"], "--out", tmp_path / "run", "--max-steps", 2,
           "--batch-size", 8, "--augment", "none", "--quiet")


def test_a_file_mixing_class_indices_and_names_is_refused_by_line(tmp_path):
    # the indices became names too: "1" a third class beside "fruit" and "rock", with exit 0
    lines = ['{"text": "apple pie", "label": "fruit"}', '{"text": "granite", "label": "rock"}',
             '{"text": "pear", "label": 1}']
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PretrainReuseError, match=r"line 3 has the label 1, a class index, but line 1 "
                                                 r"has a class name; give every label as an index"):
        text_file(tmp_path / "mixed.jsonl")
    (tmp_path / "names.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert text_file(tmp_path / "names.jsonl").class_names == ["fruit", "rock"]


def test_unlabelled_sentences_where_labels_are_needed_are_named_as_such(tmp_path):
    # an unlabelled pool, valid to embed, was called a file of malformed lines by reuse
    (tmp_path / "pool.jsonl").write_text('{"text": "apple pie"}\n{"text": "granite"}\n')
    assert text_file(tmp_path / "pool.jsonl", need_labels=False).labels is None
    with pytest.raises(PretrainReuseError, match=r"holds unlabelled sentences \(line 1 has no "
                                                 r"label\), but labelled ones are needed here"):
        text_file(tmp_path / "pool.jsonl")
