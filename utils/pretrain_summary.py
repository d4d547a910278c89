"""Print a pretraining run's learning curve from its metrics.jsonl.

    python utils/pretrain_summary.py RUN_DIR

One row per validation: step, training loss and accuracy nearest to that step, and the held-out
measure of the method, with a bar:

- moco, byol, hybrid: the in-batch training top-1 and the held-out contrastive top-1 (how often a
  view's nearest other view in the batch is its own pair; chance is 1 / batch size);
- votes: the training and held-out accuracy of the most-voted answer of the first question, and the
  held-out Dirichlet-multinomial vote NLL (lower is better).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sslsky.train.pretrain import METRICS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run directory of `sslsky pretrain`")
    args = parser.parse_args()

    records = [json.loads(line) for line in (args.run_dir / METRICS_FILE).read_text().splitlines()]
    train = {r["step"]: r for r in records if "loss" in r}
    val = [r for r in records if "val_top1" in r or "val_loss_votes" in r]
    if not val:
        raise SystemExit(f"{args.run_dir / METRICS_FILE} has no validation records (val_every=0?)")
    votes = "val_loss_votes" in val[0]
    acc_key, val_key = ("vote_acc", "val_vote_acc") if votes else ("acc", "val_top1")
    print(f"{'step':>6} {'loss':>7} {'train acc':>9} {'val acc' if votes else 'val top-1':>9}"
          + (f" {'val NLL':>8}" if votes else ""))
    for r in val:
        near = train.get(r["step"]) or (train[max(s for s in train if s <= r["step"])] if r["step"] > 0 else None)
        loss = f"{near['loss']:7.3f}" if near else f"{'-':>7}"
        acc = f"{near[acc_key]:9.3f}" if near else f"{'-':>9}"
        nll = f" {r['val_loss_votes']:8.3f}" if votes else ""
        print(f"{r['step']:6d} {loss} {acc} {r[val_key]:9.3f}{nll}  {'#' * round(40 * r[val_key])}")
    if not train:
        return
    last = train[max(train)]
    ms = {key[5:]: 1e3 * value for key, value in last.items() if key.startswith("time_")}
    print(f"{max(train)} steps, {last['images_per_s']:.0f} images/s at the end; step time (ms): "
          + ", ".join(f"{key} {value:.0f}" for key, value in ms.items()))


if __name__ == "__main__":
    main()
