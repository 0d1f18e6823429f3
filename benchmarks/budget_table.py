"""The table (and a dev-BLEU-over-time plot) of finished training runs: what each reached in its budget.

Reads each run directory as `nmt train` leaves it (config.yaml, metrics.jsonl, model/meta.json)
and prints one markdown row per run: cell, schedule, steps, median training tokens/s, the dev
BLEU of the shipped weights and which they were, the test BLEU and chrF the model card
records, and peak resident memory. With `--plot`, dev BLEU against training minutes, one line
per run. Runs meant to be compared should share the machine, the budget and the thread count
(the table prints the hardware line of each model card to make that checkable).

    python -m benchmarks.budget_table runs/b20/lstm-linear runs/b20/lstm-cosine \\
        --plot docs/linear-vs-cosine.png --out benchmarks/results/budget.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml


def _records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summarise(run: Path) -> dict[str, Any]:
    """One run's row: the facts the table and the plot need."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    meta_path = run / "model" / "meta.json"
    if not meta_path.exists():
        raise SystemExit(f"{run}: no model/meta.json: the run has not finished")
    meta = json.loads(meta_path.read_text())
    records = _records(run)
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    scores = meta["scores"]
    selection = meta.get("selection", {})
    row = {
        "run": run.name,
        "cell": config["model"].get("cell", "lstm"),
        "schedule": config["train"].get("schedule"),
        "wait_k": config["train"].get("wait_k"),
        "hardware": meta.get("hardware"),
        "minutes": round(max((r["time"] for r in records if "time" in r), default=0) / 60, 1),
        "steps": max(r["step"] for r in records if "step" in r),  # made in the budget
        "shipped_step": meta["step"],
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train))
        if train
        else None,
        "dev_bleu": round(scores["dev_bleu"], 2),
        "shipped": selection.get("chosen", "best validated"),
        "candidates": selection.get("dev_bleu", {}),
        "test_bleu": round(scores["test_bleu"], 2) if "test_bleu" in scores else None,
        "test_chrf": round(scores["test_chrf"], 2) if "test_chrf" in scores else None,
        "peak_rss_mb": max((r.get("peak_rss_mb", 0) for r in valid), default=None),
        "curve": [(round(r["time"] / 60, 2), round(r["dev_bleu"], 2)) for r in valid],
    }
    if "test_wait_k_bleu" in scores:
        row["test_wait_k"] = scores["test_wait_k"]
        row["test_wait_k_bleu"] = round(scores["test_wait_k_bleu"], 2)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| run | cell | schedule | steps | tok/s (median) | dev BLEU | shipped | "
            "test BLEU | test chrF | peak RSS (MB) |")  # fmt: skip
    lines = [head, "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['cell']} | {r['schedule']} | {r['steps']:,} | "
            f"{r['tokens_per_s']:,} | {r['dev_bleu']:.2f} | {r['shipped']} | "
            f"{r['test_bleu']:.2f} | {r['test_chrf']:.2f} | {r['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        minutes, bleu = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(minutes, bleu, marker="o", label=f"{r['run']} (test {r['test_bleu']:.1f})")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("dev BLEU (greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run directories")
    parser.add_argument("--plot", type=Path, default=None, help="write dev BLEU over time here")
    parser.add_argument("--out", type=Path, default=None, help="append the rows (JSON lines)")
    args = parser.parse_args(argv)
    rows = [summarise(run) for run in args.runs]
    print(markdown(rows))
    for r in rows:
        print(f"{r['run']}: {r['hardware']}; {r['minutes']} min; shipped step {r['shipped_step']}; "
              f"dev BLEU of the candidates {r['candidates']}")  # fmt: skip
    if args.plot:
        plot(rows, args.plot)
    if args.out:
        with args.out.open("a") as out:
            for r in rows:
                out.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
