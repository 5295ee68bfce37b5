r"""Masked games of a text classifier on one sentence: token players, baselines, ``v(x_S)``.

Players are ``n`` words of the tokenized sentence (Chen, Lou, Huang & Zhang, ICLR 2024,
as for BERT on SST-2 in Jiang, Cheng & Li, arXiv 2410.08455; docs/knowledge.md §1), chosen by
:func:`token_players`. A player is a whole word: all its pieces (a word split by the tokenizer,
"theater" = ``the ##a ##t ##er``, is one player, never one of its pieces), known by the position
of its first piece:

1. a word is *eligible* when its text (its pieces joined, the sub-word markers ``##``, ``▁`` and
   ``Ġ`` removed, lower-cased, leading and trailing punctuation stripped) has at least two
   characters, all letters (no digit or punctuation), and is not an English stop word
   (:data:`STOP_WORDS`), except, with ``negations=True``, the stop words that negate
   (:data:`NEGATIONS`: "not", "no", the stems of "didn't", ...), which flip a sentiment (an
   option; the reference drops every stop word); special tokens ([CLS], [SEP], [PAD], ...) are
   in no word. With ``negations=True`` an "n't" contraction is eligible too: sentencepiece
   tokenizers keep "isn't", "don't", "can't" as one word, which WordPiece splits into "isn",
   "'", "t" (the stem is the negation) and byte-level BPE into "isn", "'t". A hyphenated
   word is one word only where the tokenizer keeps it whole (sentencepiece: "well-made"), and
   then it is no player (not all letters); WordPiece and byte-level BPE split it at the hyphen
   into words of their own ("well", "made"), which may be players;
2. ``n`` eligible words are drawn uniformly without replacement by a generator seeded with
   ``seed`` (the explanation uses ``[seed, sample index]``: the same words for every model,
   different ones per sentence), and sorted.

The reference also explains only sentences of more than 20 tokens and draws players among the
positions below 50 (its inputs are truncated to 50 tokens); ``max_position`` here (every piece of
the word below it) and ``min_tokens`` of :class:`~.explain.ExplainConfig` reproduce that (off by
default).

The words are the ``word_ids()`` of a fast tokenizer's encoding (consecutive tokens of one word
id). Without them (slow tokenizers) the sub-word markers tell where a word starts: a WordPiece
continuation starts with ``##``; in a sentence whose pieces carry the word-start markers of
byte-level BPE (``Ġ``, RoBERTa, GPT-2) or sentencepiece (``▁``), a piece without the marker
continues a word unless it follows a special token (the first word of a sentence).

Tokens that are not players stay as they are (the context of the sentence). A coalition S keeps
the tokens of the players in S; every piece of the others is replaced by a baseline (so no piece
of an absent word stays visible): a token (``[MASK]`` by default, or ``[PAD]``) or a baseline
*embedding*, e.g. one learned for sparse interactions (:func:`learn_baseline_embedding`; Ren et
al., ICLR 2024). Either way only the *word embeddings* of the absent pieces change (a token
baseline puts its own word embedding there): the model still reads the full sentence's
``input_ids`` for everything else it derives from them, so a ``[PAD]`` baseline neither shifts
RoBERTa's position ids (counted over non-pad tokens) nor moves the token a GPT-2 or Llama
classifier reads (its last non-pad token). An encoder-decoder classifier (BART, T5) is the
exception: its decoder reads the ids too, so there the token's id replaces theirs, and an
embedding baseline is refused. ``v`` is the log-odds of the ground-truth class, as for images
(:func:`~.games.class_output`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import PretrainReuseError, check_choice, is_integer
from ..models import Backbone
from ..runtime import full_float32
from .games import (
    OUTPUTS,
    ChunkValues,
    LearnedBaseline,
    _descend,
    class_output,
    game_values,
    seed_json,
)
from .interactions import MAX_PLAYERS

__all__ = ["NEGATIONS", "STOP_WORDS", "TEXT_BASELINES", "TokenPlayers", "baseline_token",
           "eligible_positions", "learn_baseline_embedding", "masked_text_game", "token_players"]

#: Baselines of a text explanation: the [MASK] or [PAD] token, or a learned embedding.
TEXT_BASELINES = ("mask", "pad", "learned")

_STOP_WORDS = """
a about above after again against ain all am an and any are aren aren't as at be because been
before being below between both but by can couldn couldn't d did didn didn't do does doesn doesn't
doing don don't down during each few for from further had hadn hadn't has hasn hasn't have haven
haven't having he her here hers herself him himself his how i if in into is isn isn't it it's its
itself just ll m ma me mightn mightn't more most mustn mustn't my myself needn needn't no nor not
now o of off on once only or other our ours ourselves out over own re s same shan shan't she she's
should should've shouldn shouldn't so some such t than that that'll the their theirs them
themselves then there these they this those through to too under until up ve very was wasn
wasn't we were weren weren't what when where which while who whom why will with won won't wouldn
wouldn't y you you'd you'll you're you've your yours yourself yourselves
"""
#: English stop words (NLTK's list of 179), never players.
STOP_WORDS = frozenset(_STOP_WORDS.split())
#: The stop words that negate (with the stems WordPiece leaves of "n't" forms: "didn", "isn", ...;
#: whole "n't" contractions, one word under sentencepiece, are negations too: :func:`_negates`).
NEGATIONS = frozenset({"ain", "aren", "couldn", "didn", "doesn", "don", "hadn", "hasn", "haven",
                       "isn", "mightn", "mustn", "needn", "no", "nor", "not", "shan", "shouldn",
                       "wasn", "weren", "won", "wouldn"})
_EXCLUDED = {False: STOP_WORDS, True: STOP_WORDS - NEGATIONS}  # by ``negations``


@dataclass(frozen=True)
class TokenPlayers:
    """``n`` words of one tokenized sentence as players.

    Attributes:
        names: each player's word (its pieces joined, markers removed).
        pieces: the positions of every piece of each player's word (masked together), in
            increasing order of the words.
        meta: how they were chosen (rule, seed), so the choice is reproducible.
    """

    names: list[str]
    pieces: list[list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> np.ndarray:
        """(n,) int64 position of each player's first piece, increasing."""
        return np.array([p[0] for p in self.pieces], dtype=np.int64)

    @property
    def n(self) -> int:
        """The number of players (words)."""
        return len(self.pieces)


def eligible_positions(input_ids: Sequence[int], tokenizer: Any, *, negations: bool = False,
                       word_ids: Sequence[int | None] | None = None,
                       max_position: int | None = None) -> np.ndarray:
    """The first-piece positions of the words that may be players (rule 1 of the module
    docstring), increasing.

    ``word_ids``: the word of every token (``encoding.word_ids()`` of a fast tokenizer, None for
    special tokens); without them words are told by the sub-word markers.
    ``max_position``: only words whose pieces all lie below it (Chen et al. draw from 1..49).
    """
    words = _eligible_words(input_ids, tokenizer, negations, word_ids, max_position)
    return np.array([pieces[0] for pieces, _ in words], dtype=np.int64)


def _eligible_words(input_ids: Sequence[int], tokenizer: Any, negations: bool,
                    word_ids: Sequence[int | None] | None,
                    max_position: int | None) -> list[tuple[list[int], str]]:
    """(pieces, text) of each eligible word, in order (rule 1 of the module docstring)."""
    excluded = _EXCLUDED[bool(negations)]
    ids = [int(i) for i in input_ids]
    special_ids = set(tokenizer.all_special_ids)
    special = [i in special_ids for i in ids]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    words: list[list[int]] = []
    for pos, start in enumerate(_word_starts(tokens, special, word_ids)):
        if special[pos]:
            continue
        if start or not words:
            words.append([pos])
        else:
            words[-1].append(pos)
    keep = []
    for pieces in words:
        text = _word_text([tokens[p] for p in pieces])
        if max_position is not None and pieces[-1] >= max_position:
            continue
        if len(text) >= 2 and ((text.isalpha() and text.lower() not in excluded)
                               or (negations and _negates(text))):
            keep.append((pieces, text))
    return keep


def _negates(text: str) -> bool:
    """An "n't" contraction ("isn't", "don't", "can't", with ' or ’): one word, not all letters,
    under sentencepiece tokenizers, which would otherwise never let a contraction be a player."""
    word = text.lower().replace("’", "'")
    return word.endswith("n't") and (word == "n't" or word[:-3].isalpha())


def _word_text(pieces: list[str]) -> str:
    """A word's pieces joined, without sub-word markers and surrounding punctuation (a
    sentencepiece word keeps a comma that follows it: "great," is the word "great")."""
    text = "".join(piece.removeprefix("##").lstrip("▁Ġ") for piece in pieces)
    return text.strip(string.punctuation)


def _word_starts(tokens: list[str], special: list[bool],
                 word_ids: Sequence[int | None] | None) -> list[bool]:
    """Whether each token starts a word (module docstring)."""
    if word_ids is not None:
        if len(word_ids) != len(tokens):
            raise PretrainReuseError(f"word_ids has {len(word_ids)} entries for {len(tokens)} "
                                     "tokens; pass the encoding's word_ids() of this sentence")
        return [w is not None and (p == 0 or word_ids[p - 1] != w) for p, w in enumerate(word_ids)]
    marked = any(t.startswith(("Ġ", "▁")) for t, s in zip(tokens, special, strict=True) if not s)
    return [not t.startswith("##") and (not marked or t.startswith(("Ġ", "▁")) or p == 0
                                        or special[p - 1])
            for p, t in enumerate(tokens)]


def token_players(input_ids: Sequence[int], tokenizer: Any, n: int,
                  seed: int | Sequence[int] = 0, *, negations: bool = False,
                  word_ids: Sequence[int | None] | None = None,
                  max_position: int | None = None) -> TokenPlayers:
    """``n`` of the eligible words of a tokenized sentence, drawn at random (seeded).

    Args:
        input_ids: the token ids of one sentence, special tokens included.
        tokenizer: its Hugging Face tokenizer.
        n: number of players, 1 <= n <= 24.
        seed: seed (or seed sequence) of numpy's ``default_rng``.
        negations: negating stop words ("not", "didn", ...) are eligible too.
        word_ids, max_position: see :func:`eligible_positions`.
    """
    if not (is_integer(n) and 1 <= n <= MAX_PLAYERS):
        raise PretrainReuseError(f"n={n!r} token players must be an integer in 1..{MAX_PLAYERS}")
    eligible = _eligible_words(input_ids, tokenizer, negations, word_ids, max_position)
    if len(eligible) < n:
        raise PretrainReuseError(
            f"the sentence has {len(eligible)} eligible words (no special tokens, stop words, "
            f"punctuation, digits or single letters), fewer than n={n}; pick longer sentences or "
            "lower n")
    chosen = np.sort(np.random.default_rng(seed).choice(len(eligible), n, replace=False))
    pieces = [eligible[k][0] for k in chosen]
    return TokenPlayers([eligible[k][1] for k in chosen], pieces, {
        "players": "tokens", "n": int(n), "seed": seed_json(seed),
        "positions": [p[0] for p in pieces], "pieces": pieces,
        "rule": f"{n} random words of the {len(eligible)} that are no special token, "
                f"{'non-negating stop word' if negations else 'stop word'}, punctuation, digit or "
                "single letter (all pieces of a word are one player)"})


def baseline_token(tokenizer: Any, kind: str) -> int:
    """The token id absent players become: ``mask`` ([MASK]) or ``pad`` ([PAD])."""
    check_choice("baseline", kind, TEXT_BASELINES[:2])
    token = tokenizer.mask_token_id if kind == "mask" else tokenizer.pad_token_id
    if token is None:
        other = "pad" if kind == "mask" else "mask"
        raise PretrainReuseError(f"baseline={kind!r}: the tokenizer has no {kind} token; use "
                                 f"baseline={other!r} or 'learned'")
    return int(token)


def _check_text_game(model: Backbone, encoding: Mapping[str, torch.Tensor],
                     players: TokenPlayers, output: str) -> None:
    check_choice("output", output, OUTPUTS)
    ids = encoding.get("input_ids")
    if ids is None or ids.ndim != 1:
        raise PretrainReuseError("encoding must hold the 1-d input_ids of one sentence")
    last = max((p for pieces in players.pieces for p in pieces), default=-1)
    if last >= len(ids):
        raise PretrainReuseError(
            f"player position {last} is beyond the sentence's {len(ids)} "
            "tokens; choose the players on this encoding (token_players)")


def text_values(model: Backbone, encoding: Mapping[str, torch.Tensor], label: int,
                players: TokenPlayers, output: str, *, embeddings: bool) -> ChunkValues:
    """The chunk evaluator: baseline = a 0-d token id, or a (D,) embedding when ``embeddings``.

    Each coalition is the full sentence's ``input_ids`` with the absent pieces' word embeddings
    replaced (:func:`_with_word_embeddings`), not ids replaced by the baseline token: a [PAD]
    id would move RoBERTa's positions and the token a GPT-2 classifier reads. Except in an
    encoder-decoder classifier (BART, T5), whose decoder reads the sentence's ids shifted: there
    the ids are replaced, so that the decoder does not see absent words (its positions do not
    depend on the ids), and a baseline embedding is refused."""
    ids = encoding["input_ids"]
    # every piece of a player's word takes the player's bit: a piece left visible would leak
    # the absent word into v(x_S)
    pos = torch.as_tensor([p for pieces in players.pieces for p in pieces], device=ids.device)
    owner = torch.as_tensor([k for k, pieces in enumerate(players.pieces) for _ in pieces],
                            device=ids.device)
    encoder_decoder = bool(getattr(getattr(model.body, "config", None), "is_encoder_decoder",
                                   False))
    if encoder_decoder and embeddings:
        raise PretrainReuseError(f"{model.spec.name} is an encoder-decoder model, whose decoder "
                                 "reads the sentence's ids: use a token baseline ('mask' or "
                                 "'pad'), not an embedding")
    layer = model.body.get_input_embeddings()
    words = layer(ids[None])[0].detach()

    def values(baseline: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        size = len(bits)
        present = torch.ones(size, len(ids), device=ids.device)
        present[:, pos] = bits[:, owner].to(present)
        batch = {k: v.expand(size, -1) for k, v in encoding.items()}
        if encoder_decoder:
            batch["input_ids"] = torch.where(present.bool(), ids, baseline)
            return class_output(model(batch), label, output)
        if not embeddings:  # the token's word embedding, from the layer (as its id would get)
            baseline = layer(baseline.reshape(1))[0].detach()
        keep = present[..., None].to(words.dtype)
        logits = _with_word_embeddings(model, layer, keep * words + (1 - keep) * baseline, batch)
        return class_output(logits, label, output)

    return values


def _with_word_embeddings(model: Backbone, layer: torch.nn.Module, embeds: torch.Tensor,
                          batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(batch)`` with the output of its word-embedding ``layer`` replaced by ``embeds``
    (B, L, D).

    The model gets ``input_ids`` rather than ``inputs_embeds`` so that what it derives from the
    ids is the full sentence's (passing ``inputs_embeds`` would make GPT-2-style classifiers read
    the last position whatever the padding). A model that does not call the layer exactly once
    per forward, on the sentence, cannot be masked this way: refused, not silently wrong."""
    calls = 0

    def replace(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1 or out.shape != embeds.shape:
            raise PretrainReuseError(
                f"{model.spec.name}: token players need a model that embeds the sentence's "
                "words once per forward; this one embeds other tokens too")
        return embeds.to(out.dtype)

    handle = layer.register_forward_hook(replace)
    try:
        logits = model(batch)
    finally:
        handle.remove()
    if calls != 1:
        raise PretrainReuseError(f"{model.spec.name}: token players need a model that embeds "
                                 "the sentence's words with its get_input_embeddings() layer")
    return logits


@full_float32()  # as explain computes games: no TF32 on GPUs
def masked_text_game(model: Backbone, encoding: Mapping[str, torch.Tensor], label: int,
                     players: TokenPlayers, baseline: int | torch.Tensor, *,
                     output: str = "log-odds", batch_size: int = 256) -> np.ndarray:
    """``v(x_S)`` for all 2^n coalitions of token players, float64, in bitmask layout.

    Args:
        model: a text classifier (e.g. ``create_backbone("hf:<folder of a fine-tuned
            *ForSequenceClassification model>")``), called with a batch dict; its output must be
            logits.
        encoding: the tokenizer's output for one sentence, 1-d tensors (``input_ids``,
            ``attention_mask``, ...), on the model's device.
        label: the class whose output is explained.
        players: :func:`token_players` of this encoding.
        baseline: a token id (:func:`baseline_token`) or a (D,) embedding: its word embedding,
            or the embedding, replaces those of absent players' pieces (module docstring).
        output: one of :data:`~.games.OUTPUTS`.
        batch_size: sentences per forward pass.
    """
    _check_text_game(model, encoding, players, output)
    embeddings = isinstance(baseline, torch.Tensor) and baseline.ndim == 1
    b = baseline if embeddings else torch.tensor(int(baseline), device=encoding["input_ids"].device)
    values = text_values(model, encoding, label, players, output, embeddings=embeddings)
    return game_values(values, b, players.n, batch_size).numpy()


@full_float32()  # as explain computes games: no TF32 on GPUs
def learn_baseline_embedding(model: Backbone, encoding: Mapping[str, torch.Tensor], label: int,
                             players: TokenPlayers, init: torch.Tensor, lower: torch.Tensor,
                             upper: torch.Tensor, *, lr: float = 1e-3, steps: int = 50,
                             output: str = "log-odds", batch_size: int = 256) -> LearnedBaseline:
    r"""The baseline embedding b in a box that makes the AND interactions of one sentence sparsest.

    .. math:: \min_{b_{min} \le b \le b_{max}} \sum_{S \subseteq N} |I_b(S)|

    where absent player tokens have their word embedding replaced by b (D,) (Ren, Gao, Shen &
    Zhang, ICLR 2024, learn one such embedding; here per sentence and model, by the optimiser of
    :func:`~.games.learn_baseline`: projected SGD, momentum 0.9, best iterate returned).

    Args:
        model, encoding, label, players, output, batch_size: as for :func:`masked_text_game`.
        init: (D,) starting embedding, e.g. that of the [MASK] token.
        lower, upper: (D,) the box, ``lower <= init <= upper``.
        lr, steps: the optimiser's settings (the group's example: 1e-3, 50).
    """
    _check_text_game(model, encoding, players, output)
    values = text_values(model, encoding, label, players, output, embeddings=True)
    return _descend(values, init, lower, upper, players.n, lr=lr, steps=steps,
                    batch_size=batch_size)
