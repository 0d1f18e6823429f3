"""The `nmt` command line: train, translate, evaluate, serve, average, info, export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

EPILOG = "Run `nmt COMMAND --help` for the options of each command."


def _add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", type=Path, action="append", required=required, metavar="DIR",
                   help="model directory (e.g. runs/NAME/model); repeat it to decode with an "
                   "ensemble that averages the models' log-probabilities at every step")  # fmt: skip
    p.add_argument(
        "--batch-tokens", type=int, default=None, help="source tokens per decoding batch"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 uses autocast (fast on CPUs with AMX and on GPUs)")  # fmt: skip
    p.add_argument("--quantize", action="store_true",
                   help="removed: int8 runs in ONNX Runtime (`nmt export --int8`)")  # fmt: skip


def _add_search_options(p: argparse.ArgumentParser) -> None:
    """The decoding flags of translate and evaluate; each unset one keeps the model's setting."""
    g = p.add_argument_group("decoding (default: the model's decode settings)")
    g.add_argument("--beam-size", type=int, default=None, help="beam width; 1 is greedy search")
    g.add_argument("--length-penalty", type=float, default=None, metavar="ALPHA",
                   help="GNMT length penalty alpha (0: raw log-probability)")  # fmt: skip
    g.add_argument("--coverage-penalty", type=float, default=None, metavar="BETA",
                   help="GNMT coverage penalty beta")  # fmt: skip
    g.add_argument("--min-length", type=int, default=None, help="no EOS before N subwords")
    g.add_argument("--max-length-a", type=float, default=None, metavar="A",
                   help="at most A * source length + B output subwords")  # fmt: skip
    g.add_argument("--max-length-b", type=float, default=None, metavar="B")
    g.add_argument("--no-repeat-ngram", type=int, default=None, metavar="N",
                   help="no n-gram of order N appears twice in an output")  # fmt: skip
    g.add_argument("--sampling", choices=["topk", "topp"], default=None,
                   help="draw the output instead of searching (back-translation, augmentation)")  # fmt: skip
    g.add_argument("--top-k", type=int, default=None, help="topk: draw from the K best (0: all)")
    g.add_argument("--top-p", type=float, default=None,
                   help="topp: draw from the smallest set of tokens with probability >= P")  # fmt: skip
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


_SEARCH_FLAGS = {
    "beam_size": "beam_size", "length_penalty": "length_penalty",
    "coverage_penalty": "coverage_penalty", "min_length": "min_len",
    "max_length_a": "max_len_a", "max_length_b": "max_len_b",
    "no_repeat_ngram": "no_repeat_ngram", "sampling": "sampling", "top_k": "top_k",
    "top_p": "top_p", "temperature": "temperature", "seed": "seed",
}  # fmt: skip


def search_options(translator: Any, args: argparse.Namespace, **more: Any) -> Any:
    """The translator's options changed by the flags that were given (ValueError names a bad
    combination, e.g. --top-p without --sampling topp)."""
    from dataclasses import replace

    changes = {
        f: getattr(args, a) for a, f in _SEARCH_FLAGS.items() if getattr(args, a, None) is not None
    }
    if changes.get("sampling"):
        changes.setdefault("beam_size", 1)
    return replace(translator.options, **changes, **more)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmt",
        description="Attentional LSTM/GRU neural machine translation: train, translate, evaluate, serve.",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model. Everything lands in the run directory; the "
                       "shipped model is kept in RUN_DIR/model. With train.max_minutes the run "
                       "plans itself against the deadline (train.schedule: linear or cosine "
                       "decays to train.min_lr when the time is up), validates every "
                       "train.valid_every_minutes, and ships the best on dev BLEU of the last "
                       "weights, the average of the last train.average_last checkpoints and the "
                       "moving average of the weights (train.ema_decay). SIGTERM or SIGINT "
                       "stops it with a checkpoint of the step reached (exit status 143 or 130); "
                       "a checkpoint is also written every train.save_every_minutes; --resume "
                       "continues.")  # fmt: skip
    p.add_argument("--config", type=Path, required=True, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_minutes=20 (repeatable)")  # fmt: skip
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="on --resume, apply changed optimiser/LR settings with a fresh optimiser")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("translate", help="translate text from stdin or a file",
                       description="Translate one sentence per line, in input order. Output streams "
                       "as chunks finish, so it works in shell pipes on large files.")  # fmt: skip
    _add_model_options(p)
    _add_search_options(p)
    p.add_argument("--input", type=Path, default=None, help="input file (default: stdin)")
    p.add_argument("--output", type=Path, default=None, help="output file (default: stdout)")
    p.add_argument("--prefix-file", type=Path, default=None,
                   help="target prefixes, one per input line (empty line: none): each "
                   "translation starts with its prefix and continues from it")  # fmt: skip
    p.add_argument("--n-best", type=int, default=1, help="print N best translations per line")
    p.add_argument("--split-sentences", action="store_true",
                   help="a line may hold several sentences: cut it into sentences, translate "
                   "them and put the line back together with its spacing")  # fmt: skip
    p.add_argument("--alignments", action="store_true",
                   help="write JSON lines with scores, subwords, attention and word alignments")  # fmt: skip
    p.add_argument("--plot-attention", type=int, default=None, metavar="N",
                   help="save a PNG heatmap of the attention of input line N (1-based)")  # fmt: skip
    p.add_argument("--plot-file", type=Path, default=None, help="PNG path for --plot-attention")
    p.add_argument("--chunk-lines", type=int, default=2000,
                   help="lines read, sorted by length and translated together before output")  # fmt: skip

    p = sub.add_parser("evaluate", help="score translations with BLEU, chrF and TER",
                       description="Translate --src with --model and score against --ref, or score "
                       "an existing --hyp file. Scores are detokenised sacreBLEU with signatures.")  # fmt: skip
    _add_model_options(p, required=False)
    _add_search_options(p)
    p.add_argument("--src", type=Path, default=None, help="source file to translate")
    p.add_argument("--hyp", type=Path, default=None, help="existing translations to score")
    p.add_argument(
        "--ref", type=Path, action="append", required=True, help="reference file (repeatable)"
    )
    p.add_argument("--output", type=Path, default=None, help="also write the translations here")
    p.add_argument("--alignments", type=Path, default=None,
                   help="write word-level Pharaoh alignments (0-0 1-2 ...) to this file")  # fmt: skip
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: off)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--wait-k", type=int, default=None, metavar="K",
                   help="simultaneous translation: reveal the source one word at a time to a "
                   "wait-K policy (a uni-encoder model) and report AL, AP and DAL with the scores")  # fmt: skip

    p = sub.add_parser("serve", help="serve a model over HTTP (REST + web page)")
    p.add_argument("--model", required=True, action="append",
                   help="model directory; repeat it to serve several language pairs (requests "
                   "choose by source/target); A,B serves an ensemble of A and B as one model")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes (each loads the model)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    p.add_argument("--quantize", action="store_true",
                   help="removed: int8 runs in ONNX Runtime (`nmt export --int8`)")  # fmt: skip
    p.add_argument("--device", default=None)
    p.add_argument("--wait-for-model", type=float, default=None, metavar="SECONDS",
                   help="if the model fails to load, keep serving (ready 503) and retry every "
                   "SECONDS instead of exiting with an error (NMT_LOAD_RETRY_S)")  # fmt: skip

    p = sub.add_parser("average", help="average the last K checkpoints of a run into one model",
                       description="Average the weights of the run's last K checkpoints into a "
                       "model directory and score it on the run's dev split the way training "
                       "validates; without the dev split its model card says it is unscored.")  # fmt: skip
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--last", type=int, default=5, help="number of checkpoints (default 5)")
    p.add_argument(
        "--out", type=Path, default=None, help="output model dir (default RUN_DIR/model-avg)"
    )
    p.add_argument("--device", default="cpu", help="device for dev scoring (default: cpu)")
    p.add_argument("--no-score", action="store_true", help="skip dev scoring (left unscored)")

    p = sub.add_parser("export", help="export a model directory to run without PyTorch",
                       description="Export the encoder and the decoder step as ONNX graphs, with "
                       "the SentencePiece model(s), config, output vocabulary and decoding "
                       "options: a directory that `nmt translate --model`, `nmt serve --model` "
                       "and nmt.runtime (numpy, sentencepiece, onnxruntime; no torch) decode by "
                       "the same search rules.")  # fmt: skip
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--out", type=Path, required=True, metavar="DIR2", help="output directory")
    p.add_argument("--int8", action="store_true",
                   help="quantise the graphs' weights to int8 (ONNX Runtime dynamic quantisation)")  # fmt: skip

    p = sub.add_parser("info", help="parameter counts of a config or a model directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", type=Path)
    g.add_argument("--model", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size for --config (default: tokenizer.vocab_size)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")  # fmt: skip
    from nmt.checkpoint import CheckpointError
    from nmt.config import ConfigError
    from nmt.corpus import CorpusError

    handlers = {
        "train": cmd_train, "translate": cmd_translate, "evaluate": cmd_evaluate,
        "serve": cmd_serve, "average": cmd_average, "info": cmd_info, "export": cmd_export,
    }  # fmt: skip
    try:
        if args.command == "train" and argv is None:  # the command line, not a caller in Python
            from nmt.allocator import restart_with_jemalloc

            restart_with_jemalloc(sys.argv[1:])
        return handlers[args.command](args)
    except (ConfigError, CorpusError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"nmt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nmt {args.command}: interrupted", file=sys.stderr)
        return 130


# -- train ---------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from nmt.allocator import allocator_in_use
    from nmt.config import load_config
    from nmt.train import TrainingError, TrainingInterrupted, train

    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / cfg.name
    logging.getLogger("nmt.train").info("memory allocator: %s", allocator_in_use())
    try:
        result = train(cfg, run_dir, resume=args.resume, reset_optimizer=args.reset_optimizer,
                       progress=not args.no_progress)  # fmt: skip
    except TrainingError as err:
        print(f"nmt train: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # SIGTERM / SIGINT, after a checkpoint: 143 / 130
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"nmt train: {stop}", file=sys.stderr)
        return stop.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"stopped ({result.stopped_because}) at step {result.step}, epoch {result.epoch}; "
              f"best dev BLEU {result.best_bleu:.2f}")  # fmt: skip
        print(f"model: {run_dir / 'model'}   curves: {run_dir / 'curves.png'}")
    return 0


# -- translate -----------------------------------------------------------------------------------


def _read_chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load_translator(args: argparse.Namespace) -> Any:
    from nmt.runtime import OnnxTranslator, is_exported_dir

    exported = [is_exported_dir(d) for d in args.model]
    if any(exported):  # an `nmt export` directory: ONNX Runtime, no PyTorch model
        if len(args.model) > 1:
            raise ValueError("an exported (ONNX) model directory cannot be part of an ensemble")
        if args.precision != "fp32" or args.quantize or args.device not in ("cpu", "auto"):
            raise ValueError(
                f"{args.model[0]} is an exported (ONNX) model: it runs on the CPU as exported; "
                "--precision, --quantize and --device apply to PyTorch model directories (export "
                "with --int8 for int8)"
            )
        return OnnxTranslator.load(args.model[0])
    from nmt.translate import Translator

    return Translator.load(args.model, device=args.device, precision=args.precision,
                           quantize=args.quantize)  # fmt: skip


def _read_prefixes(path: Path | None, n: int) -> list[str] | None:
    if path is None:
        return None
    from nmt.corpus import read_lines

    prefixes = list(read_lines(path))
    if len(prefixes) != n:
        raise ValueError(f"{path} has {len(prefixes)} lines but the input has {n}")
    return prefixes


def _translate_split(
    translator: Any, lines: list[str], options: Any, batch_tokens: int | None
) -> list[Any]:
    """Each line cut into sentences (nmt.segment), all sentences translated together, and each
    line put back together around its sentences' translations (score: their mean)."""
    from nmt.segment import segment_text
    from nmt.translate import TranslationResult, translate_corpus

    lang = str(getattr(translator, "meta", {}).get("src_lang") or translator.cfg.data.src_lang)
    docs = [segment_text(line, lang) for line in lines]
    sentences = [s for doc in docs for s in doc.sentences]
    done: list[Any] = [None] * len(sentences)
    for i, result in translate_corpus(translator, sentences, options, batch_tokens=batch_tokens):
        done[i] = result
    out, start = [], 0
    for doc in docs:
        part = done[start : start + len(doc.sentences)]
        start += len(doc.sentences)
        score = sum(r.score for r in part) / len(part) if part else 0.0
        out.append(TranslationResult(text=doc.join([r.text for r in part]), score=score))
    return out


def cmd_translate(args: argparse.Namespace) -> int:
    from nmt.corpus import iter_lines, read_lines
    from nmt.translate import translate_corpus, word_alignment

    translator = _load_translator(args)
    want_attention = args.alignments or args.plot_attention is not None
    options = search_options(translator, args, return_attention=bool(want_attention))
    if args.n_best != 1:
        from dataclasses import replace

        options = replace(options, n_best=args.n_best)
    if args.split_sentences and (want_attention or args.n_best != 1 or args.prefix_file):
        raise ValueError("--split-sentences works on plain text: not with --alignments, "
                         "--plot-attention, --n-best or --prefix-file")  # fmt: skip
    # lines split as training data's are (at "\n" only), so output line N answers input line N
    source: Iterable[str] = (
        read_lines(args.input) if args.input else iter_lines(sys.stdin.buffer, "<stdin>")
    )
    prefixes: list[str] | None = None
    if args.prefix_file is not None:
        if args.input is None:
            raise ValueError("--prefix-file needs --input FILE (the prefixes align with its lines)")
        lines = list(source)
        prefixes, source = _read_prefixes(args.prefix_file, len(lines)), lines
    out: IO[str] = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    line_no = 0
    try:
        for chunk in _read_chunks(source, max(args.chunk_lines, 1)):
            results: list[Any] = [None] * len(chunk)
            chunk_prefixes = None
            if prefixes is not None:
                chunk_prefixes = prefixes[line_no : line_no + len(chunk)]
            if args.split_sentences:
                results = _translate_split(translator, chunk, options, args.batch_tokens)
            for i, result in translate_corpus(translator, [] if args.split_sentences else chunk,
                                              options, batch_tokens=args.batch_tokens,
                                              prefixes=chunk_prefixes, first_key=line_no):  # fmt: skip
                results[i] = result
            for i, r in enumerate(results):
                assert r is not None
                n = line_no + i + 1
                if args.plot_attention == n:
                    from nmt.plots import plot_attention

                    path = args.plot_file or Path(f"attention-{n}.png")
                    plot_attention(r.attention or [], r.src_tokens, r.tgt_tokens, path)
                    print(f"attention of line {n} saved to {path}", file=sys.stderr)
                if args.alignments:
                    record = {"line": n, "text": r.text, "score": r.score, "src_tokens": r.src_tokens,
                              "tgt_tokens": r.tgt_tokens, "attention": r.attention,
                              "alignment": word_alignment(r.src_tokens, r.tgt_tokens, r.attention)}  # fmt: skip
                    if args.n_best > 1:
                        record["n_best"] = [{"text": t, "score": s} for t, s in r.n_best]
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                elif args.n_best > 1:
                    for text, score in r.n_best:
                        out.write(f"{n - 1} ||| {text} ||| {score:.4f}\n")
                else:
                    out.write(r.text + "\n")
            out.flush()
            line_no += len(chunk)
    finally:  # the input file closes with its reader
        if args.output:
            out.close()
    return 0


# -- evaluate ------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """Lines with trailing whitespace removed, as sacrebleu reads them; bad UTF-8 names the line."""
    from nmt.corpus import read_lines

    return [line.rstrip() for line in read_lines(path)]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nmt.metrics import score_files_text

    if (args.hyp is None) == (args.src is None):
        raise ValueError(
            "give either --hyp FILE (score it) or --model DIR --src FILE (translate it)"
        )
    refs = [_read_lines(r) for r in args.ref]
    simulations: list[Any] | None = None
    if args.wait_k is not None and args.hyp is not None:
        raise ValueError("--wait-k translates --src with --model; it cannot score a --hyp file")
    if args.hyp is not None:
        hyps = _read_lines(args.hyp)
    else:
        if args.model is None:
            raise ValueError("--src needs --model DIR")
        from nmt.translate import translate_corpus, word_alignment

        translator = _load_translator(args)
        options = search_options(translator, args, return_attention=args.alignments is not None)
        src = _read_lines(args.src)
        results: list[Any] = [None] * len(src)
        if args.wait_k is not None:
            from nmt.simultaneous import simulate

            simulations = [simulate(translator, line, args.wait_k, options) for line in src]
        else:
            for i, r in translate_corpus(translator, src, options, batch_tokens=args.batch_tokens):
                results[i] = r
        hyps = [r.text for r in results] if simulations is None else [s.text for s in simulations]
        if args.output:
            args.output.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        if args.alignments:
            args.alignments.write_text("".join(
                word_alignment(r.src_tokens, r.tgt_tokens, r.attention) + "\n" for r in results
            ), encoding="utf-8")  # fmt: skip
    for path, ref in zip(args.ref, refs):
        if len(ref) != len(hyps):
            raise ValueError(f"{path} has {len(ref)} lines but there are {len(hyps)} translations")
    report = score_files_text(hyps, refs, bootstrap=args.bootstrap)
    if simulations is not None:
        from nmt.simultaneous import corpus_latency

        lat = corpus_latency([s.delays for s in simulations],
                             [s.source_length for s in simulations],
                             [len(line.split()) for line in refs[0]])  # fmt: skip
        report["latency"] = {"wait_k": args.wait_k, "al": lat.al, "ap": lat.ap, "dal": lat.dal,
                             "sentences": lat.sentences, "unit": "source words"}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        for name in ("bleu", "chrf", "ter"):
            s = report[name]
            ci = f" (95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f})" if "ci_low" in s else ""
            print(f"{name.upper():5s} {s['score']:6.2f}{ci}   {s['signature']}")
        if "latency" in report:
            lat_report = report["latency"]
            print(f"wait-{args.wait_k}: AL {lat_report['al']:.2f}  AP {lat_report['ap']:.3f}  "
                  f"DAL {lat_report['dal']:.2f}  (source words; SimulEval's definitions)")  # fmt: skip
    return 0


# -- serve, average, info ------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Serves until SIGTERM/SIGINT; exits 1 when the model cannot be loaded (unless waiting)."""

    from nmt.checkpoint import read_model_dir
    from nmt.runtime.files import is_exported_dir, read_manifest

    models = ";".join(args.model)  # "A;B": two served models; "A,B": an ensemble of A and B
    if args.wait_for_model is None:
        for part in models.replace(";", ",").split(","):
            # fail here, with a clear message, not in the server
            if is_exported_dir(part):
                read_manifest(Path(part))
            else:
                read_model_dir(Path(part))
    os.environ["NMT_MODEL_DIR"] = models
    for name, value in (("NMT_PRECISION", args.precision), ("NMT_DEVICE", args.device)):
        if value:
            os.environ[name] = value
    if args.quantize:
        from nmt.translate import INT8_MOVED

        raise ValueError(INT8_MOVED)
    if args.wait_for_model is not None:
        os.environ["NMT_LOAD_RETRY_S"] = str(args.wait_for_model)
    print(f"serving {models} on http://{args.host}:{args.port}/  (API docs at /docs)")
    # the service lives beside this package (it uses nmt, not the other way round)
    from serve.app import run_server

    return run_server(args.host, args.port, args.workers)


def cmd_average(args: argparse.Namespace) -> int:
    from nmt import checkpoint as ckpt
    from nmt.validate import write_averaged_model

    if args.last < 1:
        raise ValueError(f"--last must be at least 1, got {args.last}")
    dirs = ckpt.checkpoint_dirs(args.run_dir)
    if len(dirs) < 1:
        raise ckpt.CheckpointError(f"{args.run_dir} has no checkpoints to average")
    chosen = dirs[-args.last :]
    if len(chosen) < args.last:
        print(f"note: only {len(chosen)} checkpoints available", file=sys.stderr)
    out = args.out or args.run_dir / "model-avg"
    source_model = args.run_dir / "model"
    if not source_model.is_dir():
        raise ckpt.CheckpointError(f"{source_model} is missing; the run has no model directory")
    meta = write_averaged_model(args.run_dir, chosen, out, args.device, score=not args.no_score)
    scores = meta["scores"]
    result = (
        f"dev BLEU {scores['dev_bleu']:.2f}, chrF {scores['dev_chrf']:.2f}"
        if "dev_bleu" in scores
        else "unscored"
    )
    print(f"averaged {', '.join(d.name for d in chosen)} into {out} ({result})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nmt.export import export_onnx

    out = export_onnx(args.model, args.out, int8=args.int8)
    print(f"exported {args.model} to {out} ({'int8' if args.int8 else 'fp32'} ONNX graphs)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from nmt.config import load_config
    from nmt.model import build_model, count_parameters

    if args.model:
        from nmt.checkpoint import read_model_dir
        from nmt.tokenizer import Tokenizer

        cfg, _ = read_model_dir(args.model)
        tok = Tokenizer.load(args.model)
        sizes = (tok.src_vocab_size, tok.tgt_vocab_size)
    else:
        cfg = load_config(args.config, args.overrides)
        v = args.vocab_size or cfg.tokenizer.vocab_size
        sizes = (v, v)
    model = build_model(cfg.model, sizes[0], sizes[1], 0)
    counts = count_parameters(model)
    if args.json:
        print(json.dumps({"name": cfg.name, "vocab": sizes, "parameters": counts}, indent=2))
    else:
        print(f"{cfg.name}: vocabulary {sizes[0]} / {sizes[1]}")
        for name, n in counts.items():
            print(f"  {name:12s} {n:>14,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
