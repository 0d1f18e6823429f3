"""What a training run shows people: the loss/BLEU curves PNG and the model card README."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nmt.config import Config


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Plots training loss and dev BLEU against steps into a PNG; None when there is nothing yet."""
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(
            [r["step"] for r in train], [r["loss"] for r in train], label="train NLL/token"
        )
    if valid:
        ax_loss.plot(
            [r["step"] for r in valid], [r["dev_nll"] for r in valid], "o-", label="dev NLL/token"
        )
        ax_bleu.plot([r["step"] for r in valid], [r["dev_bleu"] for r in valid], "o-", color="C2")
    if train and all("lr" in r for r in train):  # the schedule, on its own axis
        ax_lr = ax_loss.twinx()
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], ":", color="C7",
                   label="learning rate")  # fmt: skip
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_ylim(bottom=0)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_bleu.set(xlabel="step", ylabel="BLEU", title="Dev BLEU (detokenised sacreBLEU)")
    ax_bleu.grid(alpha=0.3)
    if valid and "time" in valid[-1]:
        minutes = valid[-1]["time"] / 60
        fig.suptitle(f"{len(valid)} validations, {valid[-1]['step']} steps, {minutes:.1f} min")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_card(cfg: Config, meta: dict[str, Any]) -> str:
    """The README.md written into every saved model directory."""
    m = cfg.model
    scores = meta.get("scores", {})
    params = meta.get("parameters", {})
    lines = [
        f"# {cfg.name}: {meta.get('src_lang')} → {meta.get('tgt_lang')} translation model",
        "",
        f"An attentional {m.cell.upper()} encoder-decoder: {m.encoder.num_layers}-layer "
        f"{m.encoder.layout} encoder ({m.encoder.hidden_dim} units per direction), "
        f"{m.decoder.num_layers}-layer decoder ({m.decoder.hidden_dim} units), "
        f"{m.attention.type} attention ({m.attention.score}"
        f"{', input feeding' if m.decoder.input_feeding else ''}).",
        "",
        "| | |",
        "|---|---|",
        f"| Languages | {meta.get('src_lang')} → {meta.get('tgt_lang')} |",
        f"| Training data | {meta.get('data')} ({meta.get('train_pairs', '?'):,} pairs) |",
        f"| Parameters | {params.get('total', 0):,} |",
        f"| Vocabulary | SentencePiece {cfg.tokenizer.model_type}, {cfg.tokenizer.vocab_size}"
        f"{' joint' if cfg.tokenizer.joint else ' per side'} |",
    ]
    if meta.get("output_vocab"):
        lines.append(
            f"| Output vocabulary | {meta['output_vocab']:,} tokens: the softmax covers those seen "
            "on the target side of the training data |"
        )
    if "dev_bleu" in scores:
        lines += [
            f"| Dev BLEU | {scores['dev_bleu']:.2f} (step {scores.get('step', '?')}"
            + (f", wait-{scores['dev_wait_k']} decoding" if "dev_wait_k" in scores else "")
            + ") |",
            f"| Dev chrF | {scores.get('dev_chrf', float('nan')):.2f} |",
        ]
    else:  # e.g. averaged weights whose dev split was not at hand
        lines.append(f"| Dev BLEU | unscored: {meta.get('unscored', 'no dev scores')} |")
    if meta.get("averaged_from"):
        lines.append(f"| Weights | average of checkpoints {', '.join(meta['averaged_from'])} |")
    if "test_bleu" in scores:
        lines.append(
            f"| Test BLEU | {scores['test_bleu']:.2f} (beam {scores.get('test_beam_size')}, "
            f"{scores.get('test_data')}), chrF {scores.get('test_chrf', float('nan')):.2f} |"
        )
    if "test_wait_k_bleu" in scores:
        lines.append(
            f"| Test BLEU, wait-{scores['test_wait_k']} | {scores['test_wait_k_bleu']:.2f} "
            "(greedy, the source read as it arrives) |"
        )
    selection = meta.get("selection")
    if selection:
        others = ", ".join(
            f"{name} {bleu:.2f}"
            for name, bleu in selection["dev_bleu"].items()
            if name != selection["chosen"]
        )
        lines.append(
            f"| Weights | {selection['chosen']}, the best on dev BLEU of the candidates "
            f"({others or 'no other candidate'}) |"
        )
    calibration = meta.get("confidence")
    if calibration:
        lines.append(
            f"| Confidence | calibrated on {calibration.get('dev_sentences')} dev sentences to "
            f"predict {calibration.get('target')} from {', '.join(calibration.get('features', []))}"
            f" (Spearman {calibration.get('dev_spearman')} on dev) |"
        )
    lines += [
        f"| BLEU signature | `{scores.get('bleu_signature', '')}` |",
        f"| Training | {meta.get('step')} steps, epoch {meta.get('epoch')}, "
        f"{meta.get('train_minutes')} min, {meta.get('precision')} |",
        f"| Hardware | {meta.get('hardware')} |",
        "",
        "Dev scores come from validation during training (greedy search unless configured "
        "otherwise).",
        "",
        "## Use",
        "",
        "```",
        "nmt translate --model . < input.txt",
        "nmt serve --model .",
        "```",
        "",
        "## Parameters by component",
        "",
        "```",
        json.dumps(params, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
