"""Layers and blocks: parameters + gradients + decoding state, composed from minilm.ops.

One module per block type (attention, linear_attention, mamba, rwkv, lstm, mlp), the optional short
convolution (short_conv), the residual block that a schedule letter turns into (block), and the
parameter convention they all follow (params).
"""
from minilm.nn.attention import Attention
from minilm.nn.block import FAMILIES, ResidualBlock
from minilm.nn.linear_attention import GatedLinearAttention, LinearAttention
from minilm.nn.lstm import LSTM
from minilm.nn.mamba import Mamba
from minilm.nn.mlp import MLP
from minilm.nn.rwkv import ChannelMix, TimeMix
from minilm.nn.short_conv import ShortConv

__all__ = ["Attention", "LinearAttention", "GatedLinearAttention", "Mamba", "TimeMix", "ChannelMix", "LSTM",
           "MLP", "ShortConv", "ResidualBlock", "FAMILIES"]
