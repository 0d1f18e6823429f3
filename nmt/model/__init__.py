"""Attentional LSTM/GRU encoder-decoder models."""

from nmt.model.attention import EncoderMemory, masked_softmax
from nmt.model.decoder import DecoderState
from nmt.model.seq2seq import Seq2Seq, build_model, count_parameters

__all__ = [
    "DecoderState",
    "EncoderMemory",
    "Seq2Seq",
    "build_model",
    "count_parameters",
    "masked_softmax",
]
