"""Synthetic recall tasks: multi-query associative recall (MQAR) and passkey retrieval.

Both generators return next-token training pairs

    inputs  (N, T) int64   tokens fed to the model
    targets (N, T) int64   the token the model must predict at each position, or IGNORE_INDEX

and the loss and the accuracy count only the positions whose target is not IGNORE_INDEX (the
"answer positions"): minilm.ops.cross_entropy.forward(logits, targets, ignore_index=IGNORE_INDEX)
and `accuracy(logits, targets)` below. Everything is drawn from a numpy Generator, so a seed fixes
a data set exactly.

MQAR (Arora et al., "Zoology", 2023), following zoology/data/multiquery_ar.py
-----------------------------------------------------------------------------
The vocabulary [0, V) is split in two: keys come from [1, V/2), values from [V/2, V); 0 marks an
empty slot. With D = num_kv_pairs:

    context       k_1 v_1 k_2 v_2 ... k_D v_D                  2D tokens, keys (and values) distinct
    query region  T - 2D tokens; the D keys are placed again, in random order, at even offsets
                  2 g_1, ..., 2 g_D (g distinct), the gap g in {0, ..., (T - 2D)/2 - 1} drawn with
                  probability p(g) proportional to a (g + 1)^(a - 1), a = power_a = 0.01: a power law
                  that favours queries close to the context and makes some of them far.
    targets       at the position of each query key, its value (the next token of the Zoology
                  sequence); IGNORE_INDEX everywhere else.
    fillers       with random_non_queries=True (Zoology's default) every empty slot of the query
                  region is replaced by a uniform random token from [0, V); otherwise it stays 0.

To answer, a model must have stored all D pairs by the end of the context and look one up at each
query: the amount to remember grows with D, which is what a fixed-size state is tested on.
Requires 4 D <= T (room for D distinct even offsets) and D < V/2 (distinct keys and values).

Passkey / needle in a haystack (after the landmark-attention passkey test)
--------------------------------------------------------------------------
A number of n_digits digits is hidden at a random depth of repetitive filler text; after a query
marker the model must reproduce it:

    filler ... NEEDLE d_1 ... d_n filler ... QUERY d_1 ... d_n
               `---- at depth ----'                `-- answer: targets at QUERY and d_1 .. d_{n-1}

Token ids (PASSKEY_VOCAB_SIZE = 20 in all, so any model with vocab_size >= 20 can take it):
digits 0-9 are ids 0-9, NEEDLE = 10 ("the pass key is"), QUERY = 11 ("what is the pass key?"),
and the filler is the cycle 12, 13, ..., 19 (a sentence of 8 words repeated), starting at a random
phase. The depth is the fraction of the filler placed before the needle: uniform in [0, 1] by
default, or fixed (0 = right at the start, 1 = just before the query). The targets are the n
digits, each predicted from the query marker and the digits already given (teacher forcing);
`accuracy` counts digits and `exact_match` whole passkeys.

Shapes legend: N examples, T sequence length, V vocabulary size, D number of key-value pairs.
"""
import numpy as np

IGNORE_INDEX = -100     # the ignore_index of minilm.ops.cross_entropy: positions without a target

# passkey vocabulary
DIGITS = 10
NEEDLE = 10
QUERY = 11
FILLER_START = 12
FILLER_LENGTH = 8
PASSKEY_VOCAB_SIZE = FILLER_START + FILLER_LENGTH


def _as_rng(seed_or_rng):
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# MQAR

def draw_distinct(rng, num_examples, low, high, count):
    """count distinct integers from [low, high) per row, in random order: (num_examples, count)."""
    # a random permutation per row, cut to its first `count` entries
    return np.argsort(rng.random((num_examples, high - low)), axis=1)[:, :count] + low


def query_gaps(rng, num_examples, space, count, power_a=0.01):
    """count distinct gaps g in [0, space) per row, drawn without replacement with probability
    proportional to a (g + 1)^(a - 1), in the order drawn: (num_examples, count).

    Sampling without replacement from weights w is the same as keeping the `count` largest of
    log w + Gumbel noise (the Gumbel top-k trick), which vectorizes over the rows."""
    g = np.arange(1, space + 1, dtype=np.float64)
    log_weights = np.log(power_a) + (power_a - 1.0) * np.log(g)
    scores = log_weights[None, :] + rng.gumbel(size=(num_examples, space))
    return np.argsort(-scores, axis=1)[:, :count]


def mqar(num_examples, seq_len, num_kv_pairs, vocab_size, seed=0, power_a=0.01, random_non_queries=True):
    """Multi-query associative recall examples (see the module docstring).

    Returns (inputs (N, T), targets (N, T)) int64 with exactly num_kv_pairs answer positions per row.
    seed: an int or a numpy Generator.
    """
    N = _check_positive_int("num_examples", num_examples)
    T = _check_positive_int("seq_len", seq_len)
    D = _check_positive_int("num_kv_pairs", num_kv_pairs)
    V = _check_positive_int("vocab_size", vocab_size)
    if 4 * D > T:
        raise ValueError(f"seq_len must be >= 4 * num_kv_pairs = {4 * D} (context 2D and D query slots "
                         f"at even offsets), got seq_len = {T}")
    if D > V // 2 - 1:
        raise ValueError(f"vocab_size must leave num_kv_pairs = {D} distinct keys in [1, V/2): "
                         f"vocab_size >= {2 * D + 2}, got {V}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    rng = _as_rng(seed)

    keys = draw_distinct(rng, N, 1, V // 2, D)                   # (N, D) from [1, V/2)
    values = draw_distinct(rng, N, V // 2, V, D)                 # (N, D) from [V/2, V)
    inputs = np.zeros((N, T), dtype=np.int64)
    targets = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0:2 * D:2] = keys
    inputs[:, 1:2 * D:2] = values

    space = (T - 2 * D) // 2
    gaps = query_gaps(rng, N, space, D, power_a)                 # (N, D): slot of query j
    positions = 2 * D + 2 * gaps                                 # (N, D) query positions
    rows = np.arange(N)[:, None]
    inputs[rows, positions] = keys                               # query j asks for key j ...
    targets[rows, positions] = values                            # ... whose value is the target

    if random_non_queries:
        empty = inputs == 0
        inputs[empty] = rng.integers(0, V, size=int(empty.sum()))
    return inputs, targets


def mqar_answers_from_context(inputs, targets, num_kv_pairs):
    """Recover every answer from the sequence alone, by looking each query key up in the context.

    Returns (N, T) like targets. Used by the tests to show that the task is solvable from the
    inputs (the generator hides no information)."""
    D = num_kv_pairs
    answers = np.full(targets.shape, IGNORE_INDEX, dtype=np.int64)
    for n in range(inputs.shape[0]):
        table = dict(zip(inputs[n, 0:2 * D:2].tolist(), inputs[n, 1:2 * D:2].tolist()))
        for t in np.flatnonzero(targets[n] != IGNORE_INDEX):
            answers[n, t] = table[int(inputs[n, t])]
    return answers


# ----------------------------------------------------------------------------------------------
# passkey

def passkey(num_examples, seq_len, n_digits=5, seed=0, depth=None):
    """Passkey retrieval examples (see the module docstring).

    depth: None (uniform in [0, 1] per example) or a fraction in [0, 1] of the filler that comes
    before the needle. Returns (inputs (N, T), targets (N, T)) int64 with n_digits answer
    positions per row. seed: an int or a numpy Generator.
    """
    N = _check_positive_int("num_examples", num_examples)
    T = _check_positive_int("seq_len", seq_len)
    n = _check_positive_int("n_digits", n_digits)
    filler_len = T - 2 * (n + 1)
    if filler_len < 0:
        raise ValueError(f"seq_len must be >= 2 * (n_digits + 1) = {2 * (n + 1)} (needle and query), got {T}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be None or a fraction in [0, 1], got {depth}")
    rng = _as_rng(seed)

    digits = rng.integers(0, DIGITS, size=(N, n))
    phase = rng.integers(0, FILLER_LENGTH, size=N)
    if depth is None:
        prefix = rng.integers(0, filler_len + 1, size=N)
    else:
        prefix = np.full(N, int(round(depth * filler_len)))

    inputs = np.empty((N, T), dtype=np.int64)
    targets = np.full((N, T), IGNORE_INDEX, dtype=np.int64)
    filler = FILLER_START + (phase[:, None] + np.arange(filler_len)[None, :]) % FILLER_LENGTH
    for i in range(N):
        p = int(prefix[i])
        needle = np.concatenate([[NEEDLE], digits[i]])
        question = np.concatenate([[QUERY], digits[i]])
        inputs[i] = np.concatenate([filler[i, :p], needle, filler[i, p:], question])
        answer_start = T - (n + 1)                    # the QUERY position
        targets[i, answer_start:T - 1] = digits[i]    # predict d_1 at QUERY, d_{j+1} at d_j
    return inputs, targets


def passkey_needle_positions(inputs):
    """Position of the NEEDLE marker in each row: (N,)."""
    return np.argmax(inputs == NEEDLE, axis=1)


# ----------------------------------------------------------------------------------------------
# scoring

def predictions(logits):
    """argmax over the vocabulary: logits (N, T, V) -> (N, T)."""
    return np.argmax(logits, axis=-1)


def accuracy(logits, targets):
    """Fraction of answer positions (targets != IGNORE_INDEX) predicted exactly (argmax)."""
    keep = targets != IGNORE_INDEX
    if not keep.any():
        return 0.0
    return float(np.mean(predictions(logits)[keep] == targets[keep]))


def exact_match(logits, targets):
    """Fraction of rows whose answer positions are ALL predicted exactly."""
    keep = targets != IGNORE_INDEX
    correct = (predictions(logits) == targets) | ~keep
    return float(np.mean(np.all(correct, axis=1)))
