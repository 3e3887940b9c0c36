"""Reference operations: plain NumPy forward/backward pairs, one module per operation.

Contract (every module):  out, cache = forward(*inputs, **options);  grads = backward(dout, cache)
"""
