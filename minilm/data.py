"""Text as bytes: the byte-level tokenizer, the built-in corpus, splits and batches.

Tokenizer. A token is one byte of the UTF-8 encoding, so the vocabulary has 256 entries, needs no
training and no download, and every text round-trips exactly:

    encode(text) = list(text.encode("utf-8"))            decode(ids) = bytes(ids).decode("utf-8")

(decode replaces an incomplete multi-byte character at a cut with U+FFFD instead of failing).
Because a token is a byte, the cross-entropy in nats per token converts to bits per byte by
dividing by ln 2.

Built-in corpus (`default_corpus`): the text of the Python reference documentation topics that
ships with CPython in the standard-library module `pydoc_data.topics` (what `help("if")` shows):
about 460 kB of real English prose with some code, present on every machine with Python and
needing no network. The topics are joined in sorted key order, so the corpus is the same on every
run of one Python version (its exact content changes a little between Python versions).

Any other text: `load_text(path)` reads a file's bytes as they are (any encoding works, since the
model sees bytes).

Split: the last `val_fraction` of the tokens is the validation set, the rest the training set (one
contiguous cut, so no validation window overlaps a training window).

Batches: `sample_batch` draws B random windows of T + 1 tokens from a numpy Generator (inputs are
the first T, targets the last T); the Generator's state is saved in checkpoints so a resumed run
draws the same batches. `eval_windows` gives fixed, evenly spaced windows for a deterministic
validation loss.

Shapes legend: B batch, T time (sequence length).
"""
import math
import os

import numpy as np

VOCAB_SIZE = 256
DEFAULT_CORPUS_NAME = "pydoc_data.topics (Python reference documentation topics)"


# ----------------------------------------------------------------------------------------------
# tokenizer

def encode(text):
    """str -> int64 array of UTF-8 bytes (values in [0, 256)). bytes are taken as they are."""
    raw = text if isinstance(text, (bytes, bytearray)) else str(text).encode("utf-8")
    return np.frombuffer(bytes(raw), dtype=np.uint8).astype(np.int64)


def decode(ids):
    """int array of byte values -> str (invalid / cut UTF-8 sequences become U+FFFD)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must be bytes in [0, {VOCAB_SIZE}), got values in [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# corpora

def default_corpus():
    """The built-in English corpus: every topic of CPython's pydoc_data.topics, sorted by key."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key].strip() + "\n" for key in sorted(topics))


def load_text(path):
    """The bytes of a text file, encoded as tokens. Missing file -> FileNotFoundError; too short -> ValueError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"data path is a directory, not a text file: {path}")
    with open(path, "rb") as f:
        return encode(f.read())


class Corpus:
    """A tokenized text with its train / validation split.

    name: where the text came from; tokens: int64 (n,); train, val: the two contiguous parts.
    """

    def __init__(self, tokens, name, val_fraction=0.1, min_tokens=2):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        tokens = np.asarray(tokens, dtype=np.int64)
        self.name = name
        self.tokens = tokens
        self.val_fraction = float(val_fraction)
        self.train, self.val = split(tokens, val_fraction)
        if len(self.train) < min_tokens or len(self.val) < min_tokens:
            raise ValueError(f"text {name} is too short: {len(tokens)} bytes give {len(self.train)} training "
                             f"and {len(self.val)} validation tokens; need at least {min_tokens} each "
                             f"(sequence length + 1)")

    def __repr__(self):
        return f"Corpus({self.name!r}, {len(self.train)} train + {len(self.val)} val tokens)"


def load_corpus(path=None, val_fraction=0.1, min_tokens=2):
    """The built-in corpus (path None) or the file at `path`, split for training.

    min_tokens: each part must hold at least this many tokens (seq_len + 1 for training windows).
    """
    if path is None:
        return Corpus(encode(default_corpus()), DEFAULT_CORPUS_NAME, val_fraction, min_tokens)
    return Corpus(load_text(path), os.fspath(path), val_fraction, min_tokens)


def split(tokens, val_fraction=0.1):
    """(train, val): the first (1 - val_fraction) of the tokens and the rest."""
    n_val = int(round(len(tokens) * val_fraction))
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]


# ----------------------------------------------------------------------------------------------
# batches

def check_length(tokens, seq_len, what="text"):
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the {what} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def sample_batch(tokens, batch_size, seq_len, rng):
    """B random windows: inputs x (B, T) and targets y (B, T) = x shifted left by one token.

    The window starts are rng.integers(0, n - T, size=B): every start whose window fits.
    """
    check_length(tokens, seq_len)
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens, batch_size, seq_len, max_batches):
    """Fixed validation batches: up to max_batches * B windows spread evenly over the tokens.

    Yields (x, y) pairs like sample_batch; the same arguments always give the same windows.
    """
    check_length(tokens, seq_len, "validation text")
    last_start = len(tokens) - seq_len - 1
    n_windows = min(max_batches * batch_size, last_start + 1)
    starts = np.linspace(0, last_start, num=n_windows).astype(np.int64)
    for i in range(0, n_windows, batch_size):
        windows = np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch_size]])
        yield windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------------------------
# baselines

def unigram_entropy(tokens, reference=None):
    """Cross-entropy in nats of the unigram (byte frequency) model.

    With `reference` None: the entropy of the tokens' own byte distribution. With reference (e.g. the
    training tokens): the cross-entropy of `tokens` under reference's frequencies with add-one
    smoothing -- the loss a model that ignores context would reach on held-out text.
    """
    tokens = np.asarray(tokens)
    source = tokens if reference is None else np.asarray(reference)
    counts = np.bincount(source, minlength=VOCAB_SIZE).astype(np.float64)
    if reference is not None:
        counts += 1.0
    probs = counts / counts.sum()
    target_counts = np.bincount(tokens, minlength=VOCAB_SIZE).astype(np.float64)
    used = target_counts > 0
    return float(-np.sum(target_counts[used] * np.log(probs[used])) / target_counts.sum())


def bits_per_byte(loss_nats):
    """Cross-entropy in nats per byte-token -> bits per byte."""
    return loss_nats / math.log(2)
