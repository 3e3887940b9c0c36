"""Embedding lookup: a row gather from a table.

    out[..., :] = table[ids[...], :]        ids (...) integers in [0, V), table (V, D) -> (..., D)

Backward: each looked-up row sends its gradient back to the row it came from; a token that
appears several times receives the sum of its gradients (scatter-add, `np.add.at`, because a
plain `dtable[ids] += dout` keeps only one of the repeated writes). ids are not differentiable.

Shapes legend: B batch, T time, D channels, V vocabulary size; "..." is any shape of ids,
typically (B, T).
"""
import numpy as np

from minilm.ops._validate import as_float_array, as_int_array, check_shape


def forward(ids, table):
    """out = table[ids].

    ids: integer array of any shape (...), every value in [0, V).
    table: (V, D) float32/float64.
    Returns (out, cache): out (..., D) in table's dtype; cache = {"ids", "table_shape", "dtype"}.
    Raises ValueError when an id is outside [0, V) (numpy would wrap negative ids silently).
    """
    ids = as_int_array("ids", ids)
    table = as_float_array("table", table, 2)
    vocab_size = table.shape[0]
    if ids.size > 0:
        lowest, highest = ids.min(), ids.max()
        if lowest < 0 or highest >= vocab_size:
            raise ValueError(f"ids must lie in the valid range [0, {vocab_size}) (table has V = {vocab_size} rows), "
                             f"got ids with min {lowest} and max {highest}")

    out = table[ids]
    cache = {"ids": ids, "table_shape": table.shape, "dtype": table.dtype}
    return out, cache


def backward(dout, cache):
    """Gradients given dout = dL/dout of shape (..., D).

    Returns (None, dtable): ids get no gradient; dtable (V, D) accumulates repeated ids.
    """
    ids = cache["ids"]
    vocab_size, dim = cache["table_shape"]
    dout = as_float_array("dout", dout)
    check_shape("dout", dout, ids.shape + (dim,))
    if dout.dtype != cache["dtype"]:
        raise TypeError(f"dout must have the same dtype as table ({cache['dtype']}), got {dout.dtype}")

    dtable = np.zeros((vocab_size, dim), dtype=cache["dtype"])
    np.add.at(dtable, ids, dout)
    return None, dtable
