"""The exported graphs in ONNX Runtime: encode once, then one decoder step at a time (numpy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from nmt.runtime.files import DECODER_FILE, ENCODER_FILE, STATE_AXES, GraphSpec

Arrays = dict[str, np.ndarray]  # named tensors: the encoder memory or the decoder state


def select_rows(tensors: Arrays, idx: np.ndarray) -> Arrays:
    """Rows `idx` of the batch of a memory or state (beam reordering, dropping finished rows)."""
    return {name: np.take(t, idx, axis=STATE_AXES.get(name, 0)) for name, t in tensors.items()}


class OnnxModel:
    """The encoder and decoder-step sessions of an exported directory.

    `encode` gives the memory and the first state; `step` advances N state rows that read N
    memory rows (beam search repeats a sentence's memory per beam with `select_rows`).
    """

    def __init__(self, model_dir: Path, manifest: dict[str, Any], threads: int = 0) -> None:
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(model_dir / ENCODER_FILE), options, providers)
        self.decoder = ort.InferenceSession(str(model_dir / DECODER_FILE), options, providers)
        self.spec = GraphSpec(**manifest["graphs"])
        ids = manifest.get("output_ids")
        self.output_ids = None if ids is None else np.asarray(ids, dtype=np.int64)

    def encode(self, src: np.ndarray, src_lengths: np.ndarray) -> tuple[Arrays, Arrays]:
        """src (B, S) int64 padded, src_lengths (B,) int64 -> (memory, state)."""
        spec = self.spec
        outputs = self.encoder.run(spec.encoder_outputs, {"src": src, "src_lengths": src_lengths})
        named = dict(zip(spec.encoder_outputs, outputs, strict=True))
        src_mask = np.arange(src.shape[1])[None, :] < src_lengths[:, None]  # (B, S)
        memory = {"enc_out": named["enc_out"], "src_mask": src_mask}
        if spec.keys:
            memory["keys"] = named["keys"]
        state = {name: named[name] for name in spec.state if name != "attn_vector"}
        if spec.attn_vector:
            state["attn_vector"] = np.zeros((src.shape[0], spec.attn_vector_dim), np.float32)
        return memory, state

    def step(
        self, prev_tokens: np.ndarray, state: Arrays, memory: Arrays
    ) -> tuple[np.ndarray, Arrays, np.ndarray]:
        """One step for prev_tokens (N,) int64: log-probabilities (N, V) over the output
        columns, the new state and attention weights (N, S)."""
        spec = self.spec
        feed = {"prev_tokens": prev_tokens, **state, **memory}
        outputs = self.decoder.run(spec.decoder_outputs, feed)
        new_state = dict(zip(spec.state, outputs[1:-1], strict=True))
        return outputs[0], new_state, outputs[-1]
