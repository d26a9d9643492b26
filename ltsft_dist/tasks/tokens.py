"""Token classification (NER, POS): CoNLL files and HF datasets, first-subword labelling, and tags back per word.

Files: CoNLL-U (Universal Dependencies: ten tab-separated columns, the UPOS tag in the fourth; comments, multiword
token ranges and empty nodes skipped) and the CoNLL-2003 / WikiANN column format (the word first, its tag last,
blank lines between sentences, `-DOCSTART-` lines skipped; WikiANN's `xx:` language prefix on each word is
removed). Each word's label sits on its first subword, the others get -100 (ignored by the loss); words cut off
by `max_len` are counted, never dropped silently. Metrics: `metrics.token_accuracy` (POS) and
`metrics.entity_f1` (NER, CoNLL chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ltsft_dist.data import Examples
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks._io import load_hf_dataset, read_text
from ltsft_dist.tasks.base import Encoded, Encoding, Format, Task


@dataclass
class TaggedSentence:
    id: str
    language: str
    words: list[str]
    tags: list[str]


def read_conll(path: str | Path, language: str) -> list[TaggedSentence]:
    path, text = read_text(path)
    sentences, words, tags, start = [], [], [], 1
    conllu = None

    def close(number: int) -> None:
        nonlocal words, tags, start
        if words:
            sentences.append(TaggedSentence(f"{path.name}:{start}", language, words, tags))
        words, tags, start = [], [], number + 1

    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            close(number)
            continue
        if line.startswith("#") or line.startswith("-DOCSTART-"):
            continue
        fields = line.split("\t")
        if conllu is None:
            conllu = len(fields) == 10
        if conllu:
            if len(fields) != 10:
                raise LtsftError(f"{path}:{number}: a CoNLL-U line needs 10 tab-separated columns, found "
                                 f"{len(fields)}")
            if "-" in fields[0] or "." in fields[0]:  # multiword token range or empty node
                continue
            word, tag = fields[1], fields[3]
        else:
            fields = line.split()
            if len(fields) < 2:
                raise LtsftError(f"{path}:{number}: expected a word and its tag (the tag in the last column), "
                                 f"found {line!r}")
            word, tag = fields[0], fields[-1]
            if word.startswith(f"{language}:"):  # WikiANN (the paper's NER data) prefixes every word
                word = word[len(language) + 1:]
        words.append(word)
        tags.append(tag)
    close(len(text.split("\n")))
    if not sentences:
        raise LtsftError(f"{path}: no tagged sentences (empty, or not CoNLL format)")
    return sentences


def sentences_from_dataset(dataset, language: str, source: str, words: str = "tokens",
                           tags: str | None = None) -> list[TaggedSentence]:
    """A HF dataset with a word list and a tag list per row (e.g. wikiann: tokens/ner_tags, universal_dependencies:
    tokens/upos); integer tags go through the column's ClassLabel names."""
    tags = tags or next((c for c in ("ner_tags", "upos", "pos_tags", "tags") if c in dataset.column_names), None)
    missing = [c for c in (words, tags) if c is None or c not in dataset.column_names]
    if missing:
        raise LtsftError(f"{source}: no word/tag columns {missing} (has {dataset.column_names})")
    names = getattr(getattr(dataset.features[tags], "feature", None), "names", None)
    out = []
    for index, row in enumerate(dataset):
        row_tags = [names[t] if names is not None and isinstance(t, int) else str(t) for t in row[tags]]
        out.append(TaggedSentence(f"{source} row {index}", language, list(row[words]), row_tags))
    if not out:
        raise LtsftError(f"{source}: the dataset is empty")
    return out


def load_hf_sentences(path: str, language: str, config: str | None = None, split: str = "train"):
    dataset, source = load_hf_dataset(path, config, split)
    return sentences_from_dataset(dataset, language, source)


@dataclass
class TokenFeatures:
    examples: Examples  # input_ids, attention_mask[, token_type_ids], labels (-100 off first subwords)
    first_subword: list[list[int]]  # row -> the position of each kept word's first subword
    truncated_words: int  # words past max_len, left without a label or a prediction


def encode_tokens(tokenizer, sentences: list[TaggedSentence], max_len: int, labels: list[str]) -> TokenFeatures:
    if not getattr(tokenizer, "is_fast", False):
        raise LtsftError("token classification needs a fast tokenizer (word ids): load it with use_fast=True")
    index = {name: i for i, name in enumerate(labels)}
    enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True, max_length=max_len,
                    padding="max_length")
    rows, firsts, truncated = [], [], 0
    for i, sentence in enumerate(sentences):
        row, first, previous = [-100] * max_len, [], None
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                tag = sentence.tags[word]
                if tag not in index:
                    raise LtsftError(f"{sentence.id}: tag {tag!r} is not one of the labels {labels}; add it to "
                                     "data.labels or fix the record")
                row[position] = index[tag]
                first.append(position)
            previous = word
        truncated += len(sentence.words) - len(first)
        rows.append(row)
        firsts.append(first)
    tensors = {name: torch.tensor(enc[name]) for name in tokenizer.model_input_names if name in enc}
    tensors["labels"] = torch.tensor(rows)
    return TokenFeatures(Examples(tensors), firsts, truncated)


def predicted_tags(features: TokenFeatures, logits: torch.Tensor, labels: list[str]) -> list[list[str]]:
    """Per sentence, the tag of each kept word (its first subword's argmax)."""
    best = logits.argmax(-1)
    return [[labels[int(best[row, p])] for p in first] for row, first in enumerate(features.first_subword)]


class TokenTagging(Task):
    """A tag per word (NER, POS), predicted on its first subword; `ner` and `pos` register their own."""

    model_class = "AutoModelForTokenClassification"
    token_loss = True  # sentences have different numbers of words
    formats = {
        "conll": Format(lambda s: read_conll(s.train_file, s.language), suffixes=(".conll", ".conllu", ".txt")),
        "hf": Format(lambda s: load_hf_sentences(s.hf_dataset, s.language, s.hf_config, s.split)),
    }
    labelled = True

    def texts(self, records: list[TaggedSentence]) -> list[str]:
        return [" ".join(r.words) for r in records]

    def record_labels(self, records: list[TaggedSentence]) -> set[str]:
        return {t for r in records for t in r.tags}

    def encode(self, tokenizer, records: list[TaggedSentence], encoding: Encoding, labels: list[str]) -> Encoded:
        features = encode_tokens(tokenizer, records, encoding.max_seq_length, labels)
        return Encoded(features.examples, records, features, {"words_truncated": features.truncated_words}, labels)

    def score(self, encoded: Encoded, outputs: list[torch.Tensor], language: str, options) -> dict:
        predicted = predicted_tags(encoded.features, outputs[0], encoded.labels)
        return {**self.tag_scores([s.tags for s in encoded.records], predicted), "examples": len(encoded.records),
                "words_lost_to_truncation": encoded.features.truncated_words}

    def tag_scores(self, gold: list[list[str]], predicted: list[list[str]]) -> dict:
        raise NotImplementedError
