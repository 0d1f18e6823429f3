"""ONNX export of the encoder and the decoder step: a model directory that runs without PyTorch.

`export_onnx(model_dir, out_dir)` writes two graphs and what decoding needs beside them:

    encoder.onnx   src (B, S) int64, src_lengths (B,) int64
                   -> enc_out (B, S, He), [keys (B, S, Ha)], hidden (L, B, H), [cell (L, B, H)]
    decoder.onnx   prev_tokens (N,) int64, hidden, [cell], [attn_vector (N, H)],
                   enc_out (N, S, He), [keys], src_mask (N, S) bool
                   -> log_probs (N, V), hidden, [cell], [attn_vector], attn (N, S)
    export.json    the format, the graphs' inputs and outputs, special ids, output vocabulary
                   (the token id of each log_probs column) and the model's decoding options
    config.yaml, meta.json, spm*.model

Inputs in brackets exist only where the model has them (keys: not for the dot score; cell: LSTM
cells; attn_vector: Luong input feeding). Batch and source length are dynamic axes. The step
graph reads one memory row per state row, so beam search repeats the memory per beam once.
`nmt.runtime` decodes such a directory with ONNX Runtime and the search rules of `nmt.search`.

The graphs are traced from export-only wrappers around the model, not from the model's own
`encode` / `decode_step`: those branch on data (padding present or not, G rows per memory row,
a cached fast path) in ways a traced graph cannot keep, and the wrappers take the general branch
every time. A test checks that their step log-probabilities equal the model's within 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.config import Config, save_config
from nmt.model import EncoderMemory, Seq2Seq, count_parameters
from nmt.model.decoder import DecoderState
from nmt.model.encoder import BiRNN, reverse_index
from nmt.runtime.files import (
    CONFIG_FILE,
    DECODER_FILE,
    ENCODER_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    GraphSpec,
)
from nmt.search_options import SearchOptions
from nmt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

OPSET = 18
EXPORTABLE_CELLS = ("lstm", "gru")  # nn.LSTM / nn.GRU: the ONNX LSTM and GRU operators


class ExportError(ValueError):
    """The model cannot be exported; the message says why."""


def check_exportable(model: Seq2Seq, cfg: Config) -> None:
    """Raises ExportError naming what the ONNX export does not support in this model."""
    cell = cfg.model.cell
    if cell not in EXPORTABLE_CELLS:
        raise ExportError(
            f"cell {cell!r} cannot be exported: its recurrence is a Python loop over time steps, "
            "which a traced ONNX graph would fix to the example's source length; cells "
            f"{' and '.join(EXPORTABLE_CELLS)} export as the ONNX LSTM / GRU operators"
        )


def graph_spec(model: Seq2Seq) -> GraphSpec:
    """The optional tensors of this model's graphs."""
    decoder = model.decoder
    probe = torch.zeros(1, 1, model.encoder.output_dim)
    return GraphSpec(
        keys=decoder.attention.project_keys(probe) is not None,
        cell=decoder.is_lstm,
        attn_vector=decoder.feeds_attn_vector,
        attn_vector_dim=decoder.output_dim if decoder.feeds_attn_vector else 0,
    )


class EncoderGraph(nn.Module):
    """`Seq2Seq.encode` for tracing: the encoder always takes the padded-batch path (the
    backward direction reads each sentence reversed within its length, which is a plain flip
    when there is no padding), and the state starts from the bridge."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        encoder = model.encoder
        x = model.src_embed(src)  # (B, S, E)
        batch, max_len = src.shape
        rev_index = reverse_index(src_lengths, max_len).unsqueeze(-1)  # (B, S, 1)
        for i, layer in enumerate(encoder.layers):
            out = layer(x, rev_index) if isinstance(layer, BiRNN) else layer(x)[0]
            x = out + x if i >= encoder.residual_from else out
        last = (src_lengths - 1).view(batch, 1, 1).expand(-1, 1, x.size(-1))
        final = x.gather(1, last).squeeze(1)  # (B, He)
        if encoder.top_bidirectional:
            half = x.size(-1) // 2
            final = torch.cat([final[:, :half], x[:, 0, half:]], dim=-1)
        keys = model.decoder.attention.project_keys(x)
        state = model.decoder.init_state(final)
        outputs = [x]
        if keys is not None:
            outputs.append(keys)
        outputs.append(state.hidden)
        if model.decoder.is_lstm:
            outputs.append(state.cell)
        return tuple(outputs)


class StepGraph(nn.Module):
    """`Seq2Seq.step` plus the log-softmax, for tracing: one memory row per state row, the
    plain step (no cached fast-path weights), and the output matrix already restricted to the
    output vocabulary. Inputs and outputs are flat tensors in `GraphSpec` order."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model
        weight: Tensor = model.target_embedding.weight
        bias: Tensor = model.out_bias
        if model.out_weight is not None:
            weight = model.out_weight
        if model.output_ids is not None:
            ids = model.output_ids
            weight, bias = weight.index_select(0, ids), bias.index_select(0, ids)
        self.out_matrix: Tensor
        self.out_vector: Tensor
        self.register_buffer("out_matrix", weight.detach().clone())
        self.register_buffer("out_vector", bias.detach().clone())
        self.spec = graph_spec(model)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        model, decoder = self.model, self.model.decoder
        it = iter(inputs)
        prev_tokens, hidden = next(it), next(it)
        rows = hidden.size(1)
        cell = next(it) if self.spec.cell else hidden.new_zeros(hidden.size(0), rows, 0)
        feed = next(it) if self.spec.attn_vector else hidden.new_zeros(rows, 0)
        enc_out = next(it)
        keys = next(it) if self.spec.keys else None
        src_mask = next(it)
        memory = EncoderMemory(enc_out, src_mask, keys)
        emb = model.target_embedding(prev_tokens)  # (N, E)
        out, state, attn = decoder.step(emb, DecoderState(hidden, cell, feed), memory, None)
        if model.out_proj is not None:
            out = model.out_proj(out)
        log_probs = F.linear(out, self.out_matrix, self.out_vector).log_softmax(dim=-1)
        outputs = [log_probs, state.hidden]
        if decoder.is_lstm:
            outputs.append(state.cell)
        if decoder.feeds_attn_vector:
            outputs.append(state.attn_vector)
        outputs.append(attn)
        return tuple(outputs)


def _example_inputs(
    model: Seq2Seq, spec: GraphSpec, pad_id: int, bos_id: int
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Example inputs of both graphs: a padded batch of 3 (so the traced encoder takes the
    padding path) and the step after it."""
    lengths = torch.tensor([5, 3, 4])
    src = torch.full((3, 5), pad_id, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        src[i, :n] = torch.arange(n) + 4 + i
    with torch.no_grad():
        enc = dict(zip(spec.encoder_outputs, EncoderGraph(model)(src, lengths), strict=True))
    rows = src.size(0)
    values = {
        "prev_tokens": torch.full((rows,), bos_id, dtype=torch.long),
        "attn_vector": torch.zeros(rows, spec.attn_vector_dim),
        "src_mask": torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1),
        **enc,
    }
    return (src, lengths), tuple(values[name] for name in spec.decoder_inputs)


# the dynamic axes of the graphs' inputs and outputs, by name
_AXES: dict[str, dict[int, str]] = {
    "src": {0: "batch", 1: "src_len"},
    "src_lengths": {0: "batch"},
    "prev_tokens": {0: "batch"},
    "attn_vector": {0: "batch"},
    "src_mask": {0: "batch", 1: "src_len"},
    "enc_out": {0: "batch", 1: "src_len"},
    "keys": {0: "batch", 1: "src_len"},
    "hidden": {1: "batch"},
    "cell": {1: "batch"},
    "log_probs": {0: "batch"},
    "hidden_out": {1: "batch"},
    "cell_out": {1: "batch"},
    "attn_vector_out": {0: "batch"},
    "attn": {0: "batch", 1: "src_len"},
}


def _dynamic_shapes(names: list[str]) -> tuple[dict[int, Any], ...]:
    """torch.export's dynamic axes of each named input: batch rows (N or B), source length S."""
    dims = {"batch": torch.export.Dim("batch"), "src_len": torch.export.Dim("src_len")}
    return tuple({axis: dims[dim] for axis, dim in _AXES[name].items()} for name in names)


def _relax_shapes(path: Path) -> None:
    """Marks the outputs' batch and length axes dynamic and drops the intermediate shape notes:
    the exporter's LSTM translation records the example's source length as a fixed size there
    (the computation itself is shape-generic; ONNX Runtime infers the shapes again)."""
    import onnx

    proto = onnx.load(str(path))
    for graph_input in proto.graph.input:  # a traced loop would have fixed these
        dims = graph_input.type.tensor_type.shape.dim
        for axis, name in _AXES.get(graph_input.name, {}).items():
            if dims[axis].dim_param != name:
                raise ExportError(
                    f"the exporter fixed axis {name} of {graph_input.name} in {path.name} to "
                    f"{dims[axis].dim_value}; the graph would not take other sizes"
                )
    del proto.graph.value_info[:]
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        for axis, name in _AXES.get(output.name, {}).items():
            dims[axis].dim_param = name
    onnx.save(proto, str(path))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silences the exporter's notes on its own passes and on operators of packages we do not
    use (torchvision), which would otherwise fill the log of every export."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
) -> None:
    shapes = _dynamic_shapes(input_names)
    # The exporter swaps in a while-loop decomposition of aten.lstm / aten.gru for dynamic
    # lengths, but an op remembers the kernel it dispatched to: without this, a second export in
    # one process unrolls the loop and fixes the source length to the example's (torch 2.13).
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
        op._dispatch_cache.clear()
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            # StepGraph takes *inputs: its shapes are one entry, a tuple
            dynamic_shapes=(shapes,) if isinstance(module, StepGraph) else shapes,
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    _relax_shapes(path)


def export_model(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    cfg: Config,
    meta: dict[str, Any],
    options: SearchOptions,
    out_dir: str | Path,
    *,
    int8: bool = False,
) -> Path:
    """Writes the exported directory of a loaded model (see the module docstring).

    Args:
        options: the model's decoding rules (`Translator.options`), kept in the manifest.
        int8: also quantise the graphs' weights to int8 (ONNX Runtime dynamic quantisation).
    Raises:
        ExportError: the model has a part the export does not support.
    """
    check_exportable(model, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    spec = graph_spec(model)
    enc_args, step_args = _example_inputs(model, spec, tokenizer.pad_id, tokenizer.bos_id)
    _export_graph(
        EncoderGraph(model).eval(),
        enc_args,
        spec.encoder_inputs,
        spec.encoder_outputs,
        out / ENCODER_FILE,
    )
    _export_graph(
        StepGraph(model).eval(),
        step_args,
        spec.decoder_inputs,
        spec.decoder_outputs,
        out / DECODER_FILE,
    )
    if int8:
        quantize_int8(out)
    save_config(cfg, out / CONFIG_FILE)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", "utf-8")
    spm_files = [p.name for p in tokenizer.save(out)]
    output_ids = None if model.output_ids is None else model.output_ids.tolist()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "graphs": spec.to_dict(),
        "precision": "int8" if int8 else "fp32",
        "opset": OPSET,
        "tokenizer": spm_files,
        "special_ids": {
            "pad": tokenizer.pad_id,
            "unk": tokenizer.unk_id,
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
        },
        "output_ids": output_ids,
        "options": dataclasses.asdict(options),
        "parameters": {k: int(v) for k, v in count_parameters(model).items()},
    }
    # one key per line, the output vocabulary (thousands of ids) on one line of its own
    text = json.dumps({**manifest, "output_ids": "@"}, indent=1)
    text = text.replace('"@"', json.dumps(output_ids))
    (out / MANIFEST_FILE).write_text(text + "\n", "utf-8")
    logger.info("exported %s graphs to %s", manifest["precision"], out)
    return out


def quantize_int8(out_dir: Path) -> None:
    """Dynamic int8 quantisation of both graphs in place (weights int8, activations quantised
    per call): ONNX Runtime's `quantize_dynamic`, MatMul/Gemm and the recurrent operators."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in (ENCODER_FILE, DECODER_FILE):
        path = out_dir / name
        tmp = path.with_suffix(".fp32.onnx")
        path.replace(tmp)
        logging.disable(logging.WARNING)  # its advice to pre-process image models' graphs
        try:
            quantize_dynamic(str(tmp), str(path), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
            tmp.unlink(missing_ok=True)


def export_onnx(model_dir: str | Path, out_dir: str | Path, *, int8: bool = False) -> Path:
    """`nmt export`: loads a model directory and writes its exported directory to `out_dir`.

    Raises:
        ModelFileError: the model directory is incomplete; ExportError: see `check_exportable`.
    """
    from nmt.translate import Translator

    translator = Translator.load(model_dir)
    model = translator.model
    if not isinstance(model, Seq2Seq):
        raise ExportError("an ensemble cannot be exported; export each model on its own")
    if Path(out_dir).resolve() == Path(model_dir).resolve():
        raise ExportError("--out must be another directory than --model")
    return export_model(
        model,
        translator.tokenizer,
        translator.cfg,
        translator.meta,
        translator.options,
        out_dir,
        int8=int8,
    )
