"""Token players of a Hugging Face text classifier: a tiny BERT built from a config and a local
vocabulary, saved with save_pretrained and loaded through the package's loader; the games are
checked against the transformers model called directly."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _helpers import tiny_bert
from pretrain_reuse import load
from pretrain_reuse.cli import main
from pretrain_reuse.data.text import is_sentence_file, text_file
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import harsanyi_and, reconstruct_and
from pretrain_reuse.knowledge.explain import ExplainConfig
from pretrain_reuse.knowledge.text import (
    baseline_token,
    eligible_positions,
    learn_baseline_embedding,
    masked_text_game,
    token_players,
)
from pretrain_reuse.models import create_backbone

transformers = pytest.importorskip("transformers")

VOCAB = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a was is and but not , . ! 1 x ##s movie film plot "
         "acting story great good bad awful boring funny brilliant dull scenes actors music "
         "ending director")
WORDS = VOCAB.split()
SENTENCES = [
    (1, "the movie was great , but the plot was awful ! films"),
    (0, "the acting was dull and the story boring . the ending was bad"),
    (1, "brilliant music , funny scenes and good actors x 1 . a great director"),
    (0, "awful film . dull plot , bad acting"),
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """hf:<folder> of a randomly initialised 2-class BertForSequenceClassification."""
    return tiny_bert(tmp_path_factory.mktemp("bert"), WORDS, "BertForSequenceClassification",
                     num_labels=2, initializer_range=0.5)  # outputs that depend on the words


def _reference(folder):
    """The same folder through transformers alone: the independent reference."""
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    net = transformers.BertForSequenceClassification.from_pretrained(folder, local_files_only=True)
    return tok, net.eval()


def _log_odds(net, ids: torch.Tensor, label: int) -> float:
    with torch.no_grad():
        z = net(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits[0].double()
    return float(z[label] - z[1 - label])


def _encode(model, text):
    enc = model.preprocess.tokenizer(text, return_tensors="pt")
    return {k: v[0] for k, v in enc.items()}


def test_the_loader_keeps_the_folders_classifier_and_its_logits(bert):
    model = create_backbone(f"hf:{bert}")
    tok, net = _reference(bert)
    assert model.num_classes == 2 and model.spec.pooling == "cls"
    assert model.spec.modality == "text"
    batch = tok([t for _, t in SENTENCES], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(dict(batch)), net(**batch).logits)


def test_a_sequence_classifier_folder_without_classifier_weights_is_an_encoder(bert, tmp_path):
    folder = tmp_path / "no-classifier"
    shutil.copytree(bert, folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = create_backbone(f"hf:{folder}")
    assert model.head is None and model.spec.pooling == "mean"


def test_eligible_tokens_skip_specials_stop_words_punctuation_digits_letters_and_pieces(bert):
    model = create_backbone(f"hf:{bert}")
    tok = model.preprocess.tokenizer
    ids = tok("the movie was great , but the plot was awful ! films x 1")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[12:14] == ["film", "##s"]
    # [CLS] the movie was great , but the plot was awful ! film ##s x 1 [SEP]
    np.testing.assert_array_equal(eligible_positions(ids, tok), [2, 4, 8, 10, 12])
    a = token_players(ids, tok, 3, seed=[0, 7])
    b = token_players(ids, tok, 3, seed=[0, 7])
    np.testing.assert_array_equal(a.positions, b.positions)
    assert set(a.positions) <= {2, 4, 8, 10, 12} and list(a.positions) == sorted(a.positions)
    words = {2: "movie", 4: "great", 8: "plot", 10: "awful", 12: "films"}  # film ##s: one word
    assert a.names == [words[p] for p in a.positions]
    with pytest.raises(PretrainReuseError, match=r"5 eligible words.*n=6"):
        token_players(ids, tok, 6)



def _subword_tokenizer(kind: str):
    """A fast tokenizer trained here on a tiny corpus, so that most words split into pieces:
    WordPiece (##), byte-level BPE (Ġ, as RoBERTa) or sentencepiece-style BPE (▁)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers

    special = ["<s>", "</s>", "<pad>", "<mask>", "<unk>"]
    if kind == "wordpiece":
        tok = tokenizers.Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=70, special_tokens=special)
    elif kind == "byte-level":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=70, special_tokens=special)
    tok.train_from_iterator(["the movie was wonderful and moving", "a play about players playing",
                             "believe the screen"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")),
                                              ("</s>", tok.token_to_id("</s>"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        mask_token="<mask>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["wordpiece", "byte-level", "sentencepiece"])
def test_a_player_is_a_whole_word_judged_on_the_whole_word(kind):
    # the reference: each word tokenized alone gives the pieces of the sentence, so the words
    # start at the running sums of their piece counts (after <s>); eligibility is that of the
    # word as written ("theater" is no stop word, though its first piece is "the")
    tok = _subword_tokenizer(kind)
    text = "unbelievably wonderful screenplay players playing theater about then"
    enc = tok(text)
    words = text.split()
    pieces = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    assert enc["input_ids"][1:-1] == [i for p in pieces for i in p]
    assert len(pieces[5]) > 1 and tok.convert_ids_to_tokens(pieces[5][:1])[0].lstrip("▁Ġ") == "the"
    starts = 1 + np.cumsum([0] + [len(p) for p in pieces[:-1]])
    # a word the tokenizer does not know (<unk>, a special token) is no player
    expected = [k for k, w in enumerate(words)
                if w not in ("about", "then") and tok.unk_token_id not in pieces[k]]
    assert len(expected) >= 5
    ids = enc["input_ids"]
    np.testing.assert_array_equal(eligible_positions(ids, tok, word_ids=enc.word_ids()),
                                  starts[expected])
    np.testing.assert_array_equal(eligible_positions(ids, tok), starts[expected])  # by the markers
    players = token_players(ids, tok, len(expected), seed=0, word_ids=enc.word_ids())
    assert players.names == [words[k] for k in expected]
    assert players.pieces == [list(range(starts[k], starts[k] + len(pieces[k]))) for k in expected]


@pytest.mark.parametrize("baseline", ["mask", "pad", "embedding"])
def test_an_absent_word_has_every_piece_replaced_by_the_baseline(bert, baseline):
    # reference: the transformers model called directly on the sentence with every piece of
    # "films" (film ##s) replaced by the baseline token, or its word embeddings by the vector
    model = create_backbone(f"hf:{bert}")
    tok, net = _reference(bert)
    text = SENTENCES[0][1]
    enc = _encode(model, text)
    players = token_players(enc["input_ids"].tolist(), tok, 5, seed=0)
    k = players.names.index("films")
    assert tok.convert_ids_to_tokens(enc["input_ids"][players.pieces[k]].tolist()) == ["film", "##s"]
    ids = enc["input_ids"].clone()
    if baseline == "embedding":
        b = torch.linspace(-1, 1, net.config.hidden_size)
        embeds = net.get_input_embeddings()(ids[None]).detach()
        embeds[0, players.pieces[k]] = b
        with torch.no_grad():
            z = net(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)[None]).logits[0]
        expected = float(z[1].double() - z[0].double())
    else:
        b = baseline_token(tok, baseline)
        ids[players.pieces[k]] = b
        expected = _log_odds(net, ids, 1)
    v = masked_text_game(model, enc, 1, players, b)
    assert v[(1 << players.n) - 1 - (1 << k)] == pytest.approx(expected, abs=1e-5)


def test_negations_are_eligible_only_when_asked_for(bert):
    tok = create_backbone(f"hf:{bert}").preprocess.tokenizer
    ids = tok("the plot was not good , and the acting not brilliant")["input_ids"]
    # [CLS] the plot was not good , and the acting not brilliant [SEP]
    np.testing.assert_array_equal(eligible_positions(ids, tok), [2, 5, 9, 11])
    np.testing.assert_array_equal(eligible_positions(ids, tok, negations=True), [2, 4, 5, 9, 10, 11])
    players = token_players(ids, tok, 6, seed=0, negations=True)
    assert players.names.count("not") == 2 and "non-negating" in players.meta["rule"]
    with pytest.raises(PretrainReuseError, match="negations applies to players=tokens"):
        ExplainConfig(players="grid:2x2", negations=True)

def test_game_matches_the_model_on_the_full_sentence_and_with_every_player_masked(bert):
    model = create_backbone(f"hf:{bert}")
    _, net = _reference(bert)
    enc = _encode(model, SENTENCES[1][1])
    players = token_players(enc["input_ids"].tolist(), model.preprocess.tokenizer, 4, seed=3)
    mask = baseline_token(model.preprocess.tokenizer, "mask")
    v = masked_text_game(model, enc, 0, players, mask, batch_size=5)
    assert v[-1] == pytest.approx(_log_odds(net, enc["input_ids"], 0), abs=1e-5)
    masked = enc["input_ids"].clone()
    masked[players.positions] = mask
    assert v[0] == pytest.approx(_log_odds(net, masked, 0), abs=1e-5)
    # a coalition in the middle: players 0 and 2 present, 1 and 3 masked
    some = enc["input_ids"].clone()
    some[players.positions[[1, 3]]] = mask
    assert v[0b0101] == pytest.approx(_log_odds(net, some, 0), abs=1e-5)
    np.testing.assert_allclose(reconstruct_and(harsanyi_and(v)), v, atol=1e-12)


def test_the_mask_embedding_as_baseline_gives_the_mask_token_game(bert):
    # replacing word embeddings by the [MASK] embedding is what the [MASK] token does
    model = create_backbone(f"hf:{bert}")
    enc = _encode(model, SENTENCES[0][1])
    tok = model.preprocess.tokenizer
    players = token_players(enc["input_ids"].tolist(), tok, 4, seed=1)
    mask = baseline_token(tok, "mask")
    by_token = masked_text_game(model, enc, 1, players, mask)
    words = model.body.get_input_embeddings().weight.detach()
    np.testing.assert_allclose(masked_text_game(model, enc, 1, players, words[mask]), by_token,
                               atol=1e-5)


def test_learned_baseline_embedding_is_sparser_than_its_start_inside_its_box(bert):
    model = create_backbone(f"hf:{bert}")
    enc = _encode(model, SENTENCES[2][1])
    tok = model.preprocess.tokenizer
    players = token_players(enc["input_ids"].tolist(), tok, 4, seed=2)
    words = model.body.get_input_embeddings().weight.detach()
    init = words[baseline_token(tok, "mask")]
    lower, upper = init - words.std(0), init + words.std(0)
    runs = [learn_baseline_embedding(model, enc, 1, players, init, lower, upper, lr=0.05, steps=5)
            for _ in range(2)]
    a, b = runs
    assert a.loss[a.best_step] < a.loss[0]  # 5 steps from [MASK] do sparsify this game
    assert bool(((a.baseline >= lower) & (a.baseline <= upper)).all())
    torch.testing.assert_close(a.baseline, b.baseline, rtol=0, atol=0)
    np.testing.assert_allclose(masked_text_game(model, enc, 1, players, a.baseline), a.game,
                               atol=1e-9)


def _sentences(path):
    path.write_text("".join(json.dumps({"label": y, "text": t}) + "\n" for y, t in SENTENCES))
    return path


def test_explain_tokens_through_the_cli_reproduces_the_models_log_odds(bert, tmp_path, capsys):
    data = _sentences(tmp_path / "s.jsonl")
    argv = ["explain", "--model", f"hf:{bert}", "--data", str(data), "--players", "tokens",
            "--n", "4", "--samples", "4", "--quiet", "--out", str(tmp_path / "x")]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "explained 4 samples with n=4 players" in out
    tok, net = _reference(bert)
    for f in sorted((tmp_path / "x").glob("interactions-*.safetensors")):
        x = load(f)
        label, text = SENTENCES[x.info["index"]]
        ids = torch.tensor(tok(text)["input_ids"])
        assert x.info["players"]["players"] == "tokens" and x.info["baseline"] == "mask"
        assert x.info["label"] == label
        assert x.v[-1] == pytest.approx(_log_odds(net, ids, label), abs=1e-5)
        np.testing.assert_allclose(reconstruct_and(x.and_values), x.v, atol=1e-10)
    # a rerun checks each cached game's v(N), v(∅) by two forward passes: the model's games are
    # reused as they are, a zeroed one is computed again
    games = sorted((tmp_path / "x" / "games").glob("*.npy"))
    first = {g: np.load(g) for g in games}
    stamp = 1_000_000_000_000_000_000
    for g in games[1:]:
        os.utime(g, ns=(stamp, stamp))
    np.save(games[0], np.zeros(16))
    assert main(argv) == 0
    assert all(g.stat().st_mtime_ns == stamp for g in games[1:])
    for g, v in first.items():
        np.testing.assert_array_equal(np.load(g), v)


def test_explain_with_negations_makes_not_a_player(bert, tmp_path, capsys):
    data = tmp_path / "neg.jsonl"
    data.write_text("".join(json.dumps({"label": y, "text": t}) + "\n" for y, t in [
        (0, "the plot was not good , the acting not brilliant"),
        (1, "the film was not bad , the music not dull")]))
    # 3 eligible tokens per sentence without negations, 5 with: n=5 needs --negations
    argv = ["explain", "--model", f"hf:{bert}", "--data", str(data), "--players", "tokens",
            "--n", "5", "--samples", "2", "--quiet", "--out", str(tmp_path / "x")]
    assert main(argv) == 2 and "no sentence has n=5" in capsys.readouterr().err
    assert main([*argv, "--negations"]) == 0, capsys.readouterr().err
    tok = create_backbone(f"hf:{bert}").preprocess.tokenizer
    for f in sorted((tmp_path / "x").glob("interactions-*.safetensors")):
        x = load(f)
        ids = tok(json.loads(data.read_text().splitlines()[x.info["index"]])["text"])["input_ids"]
        names = tok.convert_ids_to_tokens([ids[p] for p in x.info["players"]["positions"]])
        assert names.count("not") == 2

def test_knowledge_of_a_text_model_against_itself_preserves_everything(bert, tmp_path, capsys):
    data = _sentences(tmp_path / "s.jsonl")
    model = create_backbone(f"hf:{bert}")
    folder_model = tmp_path / "m.safetensors"
    from pretrain_reuse.models import save_backbone

    save_backbone(model, folder_model, {})
    rc = main(["knowledge", "--model", f"hf:{bert}", "--pretrained", str(folder_model),
               "--finetuned", str(folder_model), "--data", str(data), "--players", "tokens",
               "--n", "3", "--samples", "2", "--quiet", "--out", str(tmp_path / "k")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["report"]["overall"]["preserve"]["mean"] == 1.0
    assert k["report"]["overall"]["new"]["mean"] == 0.0
    assert "contiguity" not in k  # words have no regions that touch


@pytest.mark.parametrize("argv,needle", [
    (["--model", "smallcnn-s", "--players", "tokens"], "image model"),
    (["--players", "grid:2x2"], "text model"),
    (["--players", "tokens", "--baseline", "zero"], "baseline"),
    (["--players", "tokens", "--n", "9"], "no sentence has n=9"),
    (["--players", "tokens", "--split", "test"], "--split"),
])
def test_text_user_errors_exit_2_with_one_line(bert, tmp_path, capsys, argv, needle):
    data = _sentences(tmp_path / "s.jsonl")
    base = ["explain", "--data", str(data), "--samples", "1", "--quiet", "--out",
            str(tmp_path / "x")]
    if "--model" not in argv:
        base += ["--model", f"hf:{bert}"]
    rc = main(base + argv)
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_sentence_files_are_read_with_labels_names_and_ids(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"label": "pos", "text": "good"}\n\n{"label": "neg", "text": "bad", '
                    '"id": "b"}\n')
    data = text_file(path)
    assert data.texts == ["good", "bad"] and data.labels.tolist() == [1, 0]
    assert data.class_names == ["neg", "pos"] and data.ids == ["s.jsonl:1", "b"]
    path.write_text('{"label": 1}\n')
    with pytest.raises(PretrainReuseError, match="line 1"):
        text_file(path)
    path.write_text("not json\n")
    with pytest.raises(PretrainReuseError, match="not JSON"):
        text_file(path)


def test_csv_sentence_files_read_as_the_same_sentences_in_jsonl(tmp_path):
    # pandas' to_csv quoting: delimiters, quotes and line breaks inside a text; an extra column
    rows = [("pos", "good, really", "a"), ("neg", 'the "plot"\nis thin', "b"), ("pos", "fine", "c")]
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(json.dumps({"label": y, "text": t, "id": i}) + "\n" for y, t, i in rows))
    with open(tmp_path / "s.csv", "w", newline="", encoding="utf-8-sig") as fh:  # with a BOM
        writer = csv.writer(fh)
        writer.writerow(["idx", "Sentence", "label", "id"])
        writer.writerows([(n, t, y, i) for n, (y, t, i) in enumerate(rows)])
    (tmp_path / "s.tsv").write_text("text\tclass\n" + "".join(f"{t}\t{y}\n" for y, t, _ in rows
                                                             if "\n" not in t))
    expected = text_file(jsonl)
    for path in (tmp_path / "s.csv", tmp_path / "s.tsv"):
        assert is_sentence_file(path)
    got = text_file(tmp_path / "s.csv")
    assert got.texts == expected.texts == [t for _, t, _ in rows]
    assert got.labels.tolist() == expected.labels.tolist() == [1, 0, 1]
    assert got.class_names == expected.class_names == ["neg", "pos"] and got.ids == ["a", "b", "c"]
    tsv = text_file(tmp_path / "s.tsv")
    assert tsv.texts == ["good, really", "fine"] and tsv.labels.tolist() == [0, 0]
    assert tsv.ids == ["s.tsv:2", "s.tsv:3"]  # the line each row starts on
    # unlabelled sentences to embed: no label column
    (tmp_path / "u.csv").write_text("text\nhello\n\nbye\n")
    unlabelled = text_file(tmp_path / "u.csv", need_labels=False)
    assert unlabelled.labels is None and unlabelled.ids == ["u.csv:2", "u.csv:4"]
    # pandas writes an integer column with a missing value as floats: 10.0 is the index 10
    (tmp_path / "f.csv").write_text("text,label\na,1.0\nb,0.0\nc,10.0\nd,2.5\n")
    with pytest.raises(PretrainReuseError, match=r"line 5 has the label '2\.5', a class name"):
        text_file(tmp_path / "f.csv")
    (tmp_path / "f.csv").write_text("text,label\na,1.0\nb,0.0\nc,10.0\n")
    assert text_file(tmp_path / "f.csv").labels.tolist() == [1, 0, 10]
    # lists of images are no sentence files: with a header naming paths, or without a header
    # whose first image is of a class named "text"
    (tmp_path / "images.csv").write_text("path,label,text\na.png,0,a caption\n")
    (tmp_path / "headerless.csv").write_text("0.png,text\n1.png,figure\n")
    assert not is_sentence_file(tmp_path / "images.csv")
    assert not is_sentence_file(tmp_path / "headerless.csv")
    # a .csv that does not exist cannot be told: it is refused as missing
    with pytest.raises(PretrainReuseError, match=r"missing\.csv' does not exist"):
        is_sentence_file(tmp_path / "missing.csv")


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("u.csv", "Text,Sentiment\nhello,1\n", r"holds unlabelled sentences \(line 2 has no label\)"
                                         r".*add a label column \(named label, class, target, "
                                         r"category, y\)"),
    ("two.csv", "text,sentence,label\nhello,hi,1\n", r"has 2 text columns \(text, sentence\); "
                                                    r"keep one"),
    ("neg.csv", "text,label\nhello,-1\n", r"label -1; integer labels are class indices 0\.\.C-1 "
                                         r"\(give unlabelled samples a file of their own"),
    ("e.csv", "text,label\nhello,1\nbye,\n", r"line 3 must be a row with a non-empty text cell "
                                            r"and a label"),
    ("t.csv", 'text,label\n"",1\n', "line 2 must be a row with a non-empty text cell"),
    ("h.csv", "text,label\n", r"holds no sentences; add text,label rows"),
    ("m.csv", "text,label\nhello,1\nbye,neg\n", "line 3 has the label 'neg', a class name, but "
                                               "line 2 has a class index"),
    ("b.jsonl", '{"text": "hello", "label": " "}\n', r"line 1 must be an object with a non-empty"),
    ("d.csv", "id,text,label\na,hello,1\nb,bye,0\na,again,1\n",
     r"lines 2 and 4 have the same id 'a'; make every id unique"),
])
def test_what_a_sentence_file_lacks_is_one_line_naming_the_line(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(PretrainReuseError, match=needle):
        text_file(tmp_path / name)
    with pytest.raises(PretrainReuseError, match="has no text column: a CSV file of sentences"):
        (tmp_path / "images.csv").write_text("path,label\na.png,0\n")
        text_file(tmp_path / "images.csv")


def test_a_text_model_without_the_datas_classes_is_a_user_error(bert, tmp_path, capsys):
    # an encoder saved without its classifier, and sentences of a third class
    encoder = tmp_path / "encoder"
    transformers.BertModel.from_pretrained(bert, local_files_only=True).save_pretrained(encoder)
    transformers.AutoTokenizer.from_pretrained(bert, local_files_only=True).save_pretrained(encoder)
    data = _sentences(tmp_path / "s.jsonl")
    three = tmp_path / "three.jsonl"
    three.write_text(data.read_text() + json.dumps({"label": 2, "text": SENTENCES[0][1]}) + "\n")
    capsys.readouterr()  # transformers' own messages while building the encoder
    for model, path, needle in ((f"hf:{encoder}", data, "must be a classifier with a head"),
                                (f"hf:{bert}", three, "the data has the label 2 but the model "
                                 "outputs only 2 classes")):
        rc = main(["explain", "--model", model, "--data", str(path), "--players", "tokens",
                   "--n", "3", "--samples", "1", "--quiet", "--out", str(tmp_path / "x")])
        _, err = capsys.readouterr()
        assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_integer_labels_may_cover_only_some_of_the_models_classes(bert, tmp_path, capsys):
    # a handful of sentences to explain need not hold every class the model knows
    path = tmp_path / "neg.jsonl"
    path.write_text("".join(json.dumps({"label": y, "text": t}) + "\n" for y, t in SENTENCES
                            if y == 0))
    rc = main(["explain", "--model", f"hf:{bert}", "--data", str(path), "--players", "tokens",
               "--n", "3", "--samples", "2", "--quiet", "--out", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    labels = [load(p).info["label"] for p in sorted((tmp_path / "x").glob("interactions-*"))]
    assert labels == [0, 0]


def test_the_references_sentence_length_and_position_rules_are_options(bert, tmp_path, capsys):
    # token counts with [CLS] and [SEP]: 15, 15, 16 and 10; below position 6 the first three
    # sentences have 2, 2 and 4 eligible tokens
    data = _sentences(tmp_path / "s.jsonl")
    rc = main(["explain", "--model", f"hf:{bert}", "--data", str(data), "--players", "tokens",
               "--n", "2", "--samples", "4", "--min-tokens", "15", "--max-position", "6",
               "--quiet", "--out", str(tmp_path / "x")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "explained 3 samples" in out
    xs = [load(f) for f in sorted((tmp_path / "x").glob("interactions-*.safetensors"))]
    assert sorted(x.info["index"] for x in xs) == [0, 1, 2]
    assert all(max(x.info["players"]["positions"]) < 6 for x in xs)
    assert xs[0].meta["params"]["min_tokens"] == 15 and xs[0].meta["params"]["max_position"] == 6


def _named_copy(bert, folder, names):
    """The same classifier with its classes named ``names`` (class i is names[i])."""
    shutil.copytree(bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("names", [["pos", "neg"], ["neg", "pos"]])
def test_label_names_are_the_models_classes_by_its_id2label(bert, tmp_path, capsys, names):
    model = _named_copy(bert, tmp_path / "named", names)
    data = tmp_path / "s.jsonl"
    # every sentence "pos": a data set with fewer classes than the model, known by name
    data.write_text("".join(json.dumps({"label": "pos", "text": t}) + "\n" for _, t in SENTENCES))
    rc = main(["explain", "--model", f"hf:{model}", "--data", str(data), "--players", "tokens",
               "--n", "3", "--samples", "2", "--quiet", "--out", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    tok, net = _reference(model)
    pos = net.config.label2id["pos"]  # transformers' own reading of the config
    for f in sorted((tmp_path / "x").glob("interactions-*.safetensors")):
        x = load(f)
        ids = torch.tensor(tok(SENTENCES[x.info["index"]][1])["input_ids"])
        assert x.info["label"] == pos and x.info["class"] == "pos"
        assert x.v[-1] == pytest.approx(_log_odds(net, ids, pos), abs=1e-5)


def test_integer_labels_are_named_by_the_models_id2label(bert, tmp_path, capsys):
    # integer labels are the model's class indices, so the model's names name them
    model = _named_copy(bert, tmp_path / "named", ["pos", "neg"])
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"label": y, "text": t}) + "\n" for y, t in SENTENCES))
    rc = main(["explain", "--model", f"hf:{model}", "--data", str(data), "--players", "tokens",
               "--n", "3", "--samples", "4", "--quiet", "--out", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    infos = [load(f).info for f in sorted((tmp_path / "x").glob("interactions-*.safetensors"))]
    assert {i["label"] for i in infos} == {0, 1}
    assert all(i["class"] == ["pos", "neg"][i["label"]] for i in infos)


@pytest.mark.parametrize("names", [None, ["pos", "neg"], ["neg", "pos"]])
def test_evaluate_scores_a_text_classifier_as_transformers_predicts(bert, tmp_path, capsys, names):
    # labels as names are matched by the model's id2label; integer labels are its class indices
    model = bert if names is None else _named_copy(bert, tmp_path / "named", names)
    tok, net = _reference(model)
    rows = [{"text": t, "label": y if names is None else ["neg", "pos"][y]} for y, t in SENTENCES]
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    rc = main(["evaluate", "--model", f"hf:{model}", "--data", str(data), "--batch-size", "3",
               "--quiet", "--out", str(tmp_path / "e.json")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    with torch.no_grad():
        predicted = [int(net(**tok(t, return_tensors="pt")).logits.argmax()) for _, t in SENTENCES]
    truth = [y if names is None else names.index(["neg", "pos"][y]) for y, _ in SENTENCES]
    correct = np.array(predicted) == np.array(truth)
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["top1"] == pytest.approx(correct.mean()) and scores["n"] == len(SENTENCES)
    per_class = [correct[np.array(truth) == c].mean() for c in sorted(set(truth))]
    assert scores["mean_class_acc"] == pytest.approx(np.mean(per_class))
    assert scores["classes_matched_by"] == ("position" if names is None else "name")
    assert f"on {len(SENTENCES)} sentences of {data}" in out


def test_evaluate_scores_class_indices_of_an_unnamed_model_as_given(bert, tmp_path, capsys):
    # a file of class-0 sentences only, as indices, on a 2-way head that names no classes: label
    # 0 is output 0 (as an ImageNet index is), with notes; beyond the head it is refused
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"label": 0, "text": t}) + "\n" for _, t in SENTENCES))
    argv = ["evaluate", "--model", f"hf:{bert}", "--data", str(data), "--out",
            str(tmp_path / "e.json")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "integer labels name no classes, so they were scored by position" in err
    assert "the data has no sentence of 1 of the model's 2 classes" in err
    tok, net = _reference(bert)
    with torch.no_grad():
        predicted = [int(net(**tok(t, return_tensors="pt")).logits.argmax()) for _, t in SENTENCES]
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["top1"] == pytest.approx(np.mean(np.array(predicted) == 0))
    assert scores["classes_matched_by"] == "position" and scores["classes_without_images"] == ["1"]
    data.write_text("".join(json.dumps({"label": 2 * (i % 2), "text": t}) + "\n"
                            for i, (_, t) in enumerate(SENTENCES)))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "but they go up to 2 and the model has 2 outputs" in err


def test_explain_records_each_samples_prediction_and_notes_the_misclassified(bert, tmp_path,
                                                                            capsys):
    tok, net = _reference(bert)
    with torch.no_grad():
        predicted = [int(net(**tok(t, return_tensors="pt")).logits.argmax()) for _, t in SENTENCES]
    wrong = sum(p != y for p, (y, _) in zip(predicted, SENTENCES, strict=True))
    assert 0 < wrong < len(SENTENCES)  # the random network errs on some sentences, not all
    rc = main(["explain", "--model", f"hf:{bert}", "--data", str(_sentences(tmp_path / "s.jsonl")),
               "--players", "tokens", "--n", "3", "--samples", str(len(SENTENCES)),
               "--out", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    infos = [load(f).info for f in sorted((tmp_path / "x").glob("interactions-*.safetensors"))]
    assert len(infos) == len(SENTENCES)
    assert all(i["predicted"] == predicted[i["index"]] for i in infos)
    assert f"note: the model misclassifies {wrong} of the {len(SENTENCES)} samples explained" in err


def test_a_label_name_the_model_does_not_know_is_one_line_naming_it(bert, tmp_path, capsys):
    model = _named_copy(bert, tmp_path / "named", ["pos", "neg"])
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"label": "good" if y else "pos", "text": t}) + "\n"
                            for y, t in SENTENCES))
    rc = main(["explain", "--model", f"hf:{model}", "--data", str(data), "--players", "tokens",
               "--n", "3", "--samples", "2", "--quiet", "--out", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1, err
    assert "'good'" in err and "'pos', 'neg'" in err


def test_knowledge_numbers_label_names_as_the_model_does(bert, tmp_path, capsys):
    # sorted numbering (neg=0, pos=1) would explain the other class of a model whose class 0 is
    # "pos": the sentences are numbered by the model's id2label
    model = _named_copy(bert, tmp_path / "named", ["pos", "neg"])
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"label": ["neg", "pos"][y], "text": t}) + "\n"
                            for y, t in SENTENCES))
    weights = tmp_path / "m.safetensors"
    from pretrain_reuse.models import save_backbone

    save_backbone(create_backbone(f"hf:{model}"), weights, {})
    rc = main(["knowledge", "--model", f"hf:{model}", "--pretrained", str(weights),
               "--finetuned", str(weights), "--data", str(data), "--players", "tokens",
               "--n", "3", "--samples", "2", "--quiet", "--out", str(tmp_path / "k")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    paths = sorted((tmp_path / "k" / "finetuned").glob("interactions-*.safetensors"))
    assert paths
    for path in paths:
        info = load(path).info
        assert info["class"] == ["pos", "neg"][info["label"]]  # the model's own numbering


def test_a_text_model_fine_tuned_here_is_numbered_by_the_classes_its_run_recorded(bert, tmp_path,
                                                                                  capsys):
    # its config's id2label (pos, neg) is the classifier it started from; its head, as a run
    # here saves it, follows the sorted order of its data's classes (neg, pos), which the run
    # records: explain and knowledge numbered the data by the id2label and explained the
    # other class
    from pretrain_reuse.models import save_backbone

    model = _named_copy(bert, tmp_path / "named", ["pos", "neg"])
    net = create_backbone(f"hf:{model}")
    with torch.no_grad():
        net.head.weight.copy_(net.head.weight[[1, 0]].clone())
        net.head.bias.copy_(net.head.bias[[1, 0]].clone())
    weights = save_backbone(net, tmp_path / "here.safetensors",
                            {"inputs": {"class_names": json.dumps(["neg", "pos"])}})
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"label": "pos", "text": t}) + "\n" for _, t in SENTENCES))
    common = ["--model", f"hf:{model}", "--data", str(data), "--players", "tokens", "--n", "3",
              "--samples", "2", "--quiet"]
    assert main(["explain", *common, "--weights", str(weights), "--out", str(tmp_path / "x")]) == 0
    assert main(["knowledge", *common, "--pretrained", str(weights), "--finetuned", str(weights),
                 "--out", str(tmp_path / "k")]) == 0, capsys.readouterr().err
    tok, start = _reference(model)  # the classifier it started from: "pos" is its output 0
    for folder in (tmp_path / "x", tmp_path / "k" / "finetuned"):
        paths = sorted(folder.glob("interactions-*.safetensors"))
        assert paths
        for path in paths:
            x = load(path)
            ids = torch.tensor(tok(SENTENCES[x.info["index"]][1])["input_ids"])
            assert x.info["label"] == 1 and x.info["class"] == "pos"
            assert x.v[-1] == pytest.approx(_log_odds(start, ids, 0), abs=1e-5)


def test_a_sentence_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"label": 0, "text": "good"}\n{"label": 1, "text": "bad"}\n')
    data = text_file(path)
    assert data.texts == ["good", "bad"] and data.labels.tolist() == [0, 1]


# --- models that read more than word embeddings from input_ids: RoBERTa, GPT-2 -------------------

# every word of it is in the byte-level tokenizer's corpus; its last word is eligible
LONG = "the wonderful movie was moving and players playing the screen believe"


def _tiny_config(cls, tok, **kw):
    torch.manual_seed(0)
    return cls(vocab_size=len(tok), num_labels=2, initializer_range=0.5, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    """hf:<folder> of a RobertaForSequenceClassification (positions counted on from the pad index)
    whose tokenizer sets no model_max_length, so the model's 20 position embeddings are the
    limit: 20 - (pad + 1) = 17 positions usable."""
    folder = tmp_path_factory.mktemp("roberta")
    tok = _subword_tokenizer("byte-level")
    cfg = _tiny_config(transformers.RobertaConfig, tok, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=20)
    transformers.RobertaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """hf:<folder> of a GPT2ForSequenceClassification whose pad token is its eos token (no mask
    token), which adds no special tokens, as GPT-2's own tokenizer."""
    from tokenizers import processors

    folder = tmp_path_factory.mktemp("gpt2")
    backend = _subword_tokenizer("byte-level").backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                               eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    cfg = _tiny_config(transformers.GPT2Config, tok, n_embd=16, n_layer=2, n_head=2,
                       n_positions=64)
    transformers.GPT2ForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _all_words(model, text):
    """The encoding of ``text`` and every eligible word of it as a player."""
    tok = model.preprocess.tokenizer
    enc = tok(text, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    n = len(eligible_positions(ids, tok, word_ids=enc.word_ids(0)))
    return {k: v[0] for k, v in enc.items()}, token_players(ids, tok, n, word_ids=enc.word_ids(0))


def _absent(players, mask: int) -> list[int]:
    return [p for k, pieces in enumerate(players.pieces) if not (mask >> k) & 1 for p in pieces]


def test_a_pad_baseline_keeps_robertas_positions_those_of_the_full_sentence(roberta):
    # reference: transformers' RoBERTa on the ids with absent pieces made <pad>, its position
    # ids given explicitly as the full sentence's (2, 3, ...: no token of it is <pad>); left to
    # itself RoBERTa counts positions over non-pad tokens, so every later word would move
    model = create_backbone(f"hf:{roberta}")
    net = transformers.RobertaForSequenceClassification.from_pretrained(roberta).eval()
    enc, players = _all_words(model, "the wonderful movie was moving players playing")
    pad = baseline_token(model.preprocess.tokenizer, "pad")
    v = masked_text_game(model, enc, 1, players, pad)
    positions = torch.arange(len(enc["input_ids"]))[None] + pad + 1
    for mask in range(1 << players.n):
        ids = enc["input_ids"].clone()
        ids[_absent(players, mask)] = pad
        with torch.no_grad():
            z = net(input_ids=ids[None], position_ids=positions).logits[0].double()
        assert v[mask] == pytest.approx(float(z[1] - z[0]), abs=1e-5), bin(mask)


def test_a_pad_baseline_keeps_the_token_a_gpt2_classifier_reads(gpt2):
    # reference: GPT-2's hidden state at the sentence's last token (the token it reads on the
    # full sentence), the absent pieces' word embeddings those of <pad> (= </s>); transformers'
    # classifier on pad ids would read the last token that is not <pad>, an earlier one whenever
    # the last word is absent
    model = create_backbone(f"hf:{gpt2}")
    tok = model.preprocess.tokenizer
    assert tok.mask_token_id is None and tok.pad_token_id == tok.eos_token_id
    net = transformers.GPT2ForSequenceClassification.from_pretrained(gpt2).eval()
    enc, players = _all_words(model, "the wonderful movie was moving players playing")
    last = len(enc["input_ids"]) - 1
    assert players.pieces[-1][-1] == last  # "playing" ends the sentence
    pad = baseline_token(tok, "pad")
    v = masked_text_game(model, enc, 1, players, pad)
    wte = net.get_input_embeddings()
    for mask in range(1 << players.n):
        ids = enc["input_ids"].clone()
        ids[_absent(players, mask)] = pad
        with torch.no_grad():
            hidden = net.transformer(inputs_embeds=wte(ids)[None]).last_hidden_state[0, last]
            z = net.score(hidden).double()
        assert v[mask] == pytest.approx(float(z[1] - z[0]), abs=1e-5), bin(mask)
    # v(N) is the classifier's own output on the sentence
    with torch.no_grad():
        z = net(input_ids=enc["input_ids"][None]).logits[0].double()
    assert v[-1] == pytest.approx(float(z[1] - z[0]), abs=1e-5)


def test_roberta_without_a_tokenizer_limit_explains_sentences_longer_than_its_positions(
        roberta, tmp_path, capsys):
    # 20 position embeddings, counted from pad + 1 = 3 on: 17 tokens at most, not 20
    model = create_backbone(f"hf:{roberta}")
    assert model.preprocess.tokenizer.model_max_length > 10**9
    assert model.spec.max_length == 20 - (model.body.config.pad_token_id + 1)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"label": 1, "text": " ".join([LONG] * 3)}) + "\n")
    assert len(model.preprocess.tokenizer(" ".join([LONG] * 3))["input_ids"]) > 20
    rc = main(["explain", "--model", f"hf:{roberta}", "--data", str(data), "--players", "tokens",
               "--n", "3", "--samples", "1", "--quiet", "--out", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 0, err


def _sentencepiece_with_contractions():
    """A sentencepiece-style (Metaspace) tokenizer that keeps "isn't", "can’t", "well-made" whole."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    text = "this movie isn't good, I don't like it. not a well-made film, I can’t say n't"
    tok.train_from_iterator([text] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                               eos_token="</s>", pad_token="<pad>",
                                               unk_token="<unk>")
    return tok, text


def test_negations_include_nt_contractions_that_a_sentencepiece_tokenizer_keeps_whole():
    # reference: the words as written, one piece each here
    tok, text = _sentencepiece_with_contractions()
    enc = tok(text)
    words = text.split()
    assert [t.lstrip("▁") for t in enc.tokens()[1:-1]] == words
    name = {1 + k: w.strip(",.") for k, w in enumerate(words)}
    without = eligible_positions(enc["input_ids"], tok, word_ids=enc.word_ids())
    assert [name[p] for p in without] == ["movie", "good", "like", "film", "say"]
    # "well-made", one word here, is no player either way: not all letters
    negating = ["movie", "isn't", "good", "don't", "like", "not", "film", "can’t", "say", "n't"]
    with_neg = eligible_positions(enc["input_ids"], tok, word_ids=enc.word_ids(), negations=True)
    assert [name[p] for p in with_neg] == negating
    players = token_players(enc["input_ids"], tok, 10, word_ids=enc.word_ids(), negations=True)
    assert players.names == negating


def test_an_encoder_decoder_classifier_has_its_ids_masked_and_no_embedding_baseline(tmp_path):
    # BART's decoder reads the sentence's ids shifted, so the ids themselves are masked there
    # (its positions do not depend on them); reference: transformers' BART on the masked ids
    folder = tmp_path / "bart"
    tok = _subword_tokenizer("byte-level")
    cfg = _tiny_config(transformers.BartConfig, tok, d_model=16, encoder_layers=1,
                       decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                       encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=64,
                       decoder_start_token_id=tok.eos_token_id, id2label={0: "neg", 1: "pos"})
    transformers.BartForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = create_backbone(f"hf:{folder}")
    net = transformers.BartForSequenceClassification.from_pretrained(folder).eval()
    enc, players = _all_words(model, "the wonderful movie was moving")
    mask = baseline_token(tok, "mask")
    v = masked_text_game(model, enc, 1, players, mask)
    for coalition in range(1 << players.n):
        ids = enc["input_ids"].clone()
        ids[_absent(players, coalition)] = mask
        with torch.no_grad():
            z = net(input_ids=ids[None]).logits[0].double()
        assert v[coalition] == pytest.approx(float(z[1] - z[0]), abs=1e-5)
    words = model.body.get_input_embeddings().weight.detach()
    with pytest.raises(PretrainReuseError, match=r"encoder-decoder.*token baseline"):
        masked_text_game(model, enc, 1, players, words[mask])
