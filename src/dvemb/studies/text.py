"""Offline text for the language-model experiments: a corpus, a locally trained tokenizer, fixed windows.

The corpus is read from local files only: Shakespeare's plays straight from a
``.tar.gz`` of plain-text files, or, with no path, the English prose CPython ships in
``pydoc_data/topics.py``. The tokenizer is a byte-level BPE trained on that corpus
with Hugging Face ``tokenizers`` (nothing is downloaded); decoding is lossless.
"""

from __future__ import annotations

import html
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


@dataclass(frozen=True)
class Document:
    """One source text of the corpus."""

    name: str
    text: str


def read_tar_texts(path: str | os.PathLike) -> list[Document]:
    """Every ``.txt`` member of a (gzip-compressed) tar archive, sorted by name, without extracting it."""
    docs = []
    with tarfile.open(path, "r:*") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith(".txt"):
                raw = archive.extractfile(member).read()  # type: ignore[union-attr]
                docs.append(Document(os.path.basename(member.name), _decode(raw)))
    if not docs:
        raise ValueError(f"{path}: the archive holds no .txt files")
    return sorted(docs, key=lambda d: d.name)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_pydoc_topics() -> list[Document]:
    """The help topics CPython ships in ``pydoc_data/topics.py`` (about 0.5 MB of English prose)."""
    from pydoc_data.topics import topics

    return [Document(name, text) for name, text in sorted(topics.items())]


def load_corpus(path: str | os.PathLike | None) -> list[Document]:
    """Documents of the archive at ``path``, or the pydoc topics when ``path`` is None."""
    return read_pydoc_topics() if path is None else read_tar_texts(path)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` tokens, trained on ``texts``."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("the language-model experiments need Hugging Face tokenizers and transformers: "
                          "pip install 'dvemb[hf]'") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def corpus_name(path: str | os.PathLike | None) -> str:
    """How a study names the corpus :func:`load_corpus` reads from ``path``."""
    return "pydoc topics (CPython)" if path is None else str(path)


def tokenized_windows(path: str | os.PathLike | None, vocab_size: int, length: int) -> tuple[object, np.ndarray]:
    """The corpus at ``path`` (:func:`load_corpus`), a tokenizer of ``vocab_size`` trained on it, and its distinct
    windows of ``length`` tokens (:func:`windows`)."""
    docs = load_corpus(path)
    tokenizer = train_tokenizer((d.text for d in docs), vocab_size)
    return tokenizer, windows(tokenizer, docs, length)


def windows(tokenizer, docs: Sequence[Document], length: int) -> np.ndarray:
    """Distinct non-overlapping windows of ``length`` tokens of every document, as int64 [n, length]."""
    rows = []
    for doc in docs:
        ids = np.asarray(tokenizer.encode(doc.text).ids, dtype=np.int64)
        n = len(ids) // length
        rows.append(ids[: n * length].reshape(n, length))
    stacked = np.concatenate(rows) if rows else np.zeros((0, length), dtype=np.int64)
    _, first = np.unique(stacked, axis=0, return_index=True)  # a verbatim repeat would tie with its copy
    return stacked[np.sort(first)]


def words(text: str) -> set[str]:
    """The lower-cased words of ``text``."""
    return {w.lower() for w in _WORD.findall(text)}


def highlight(text: str, shared: set[str]) -> str:
    """``text`` as HTML with every word in ``shared`` (lower case) wrapped in ``<mark>``."""
    out, last = [], 0
    for match in _WORD.finditer(text):
        out.append(html.escape(text[last:match.start()]))
        word = html.escape(match.group())
        out.append(f"<mark>{word}</mark>" if match.group().lower() in shared else word)
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)
