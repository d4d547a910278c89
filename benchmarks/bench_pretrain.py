"""Pretraining speed: the step-time split of the real trainer, and MoCo v2 training images/s per encoder.

    python benchmarks/bench_pretrain.py            # CPU: split + ResNet-18/50 at 64x64x5 (fp32, bf16, channels_last)
    python benchmarks/bench_pretrain.py --quick    # fewer steps
    python benchmarks/bench_pretrain.py --device cuda --compile   # on a GPU: also torch.compile

1. **Step split**: ``sslsky pretrain`` on a packed mock SDSS survey (107x107x5 -> 64x64, all astro
   augmentations on, ResNet-18 with the Hayat stem), timed by the trainer itself (``time_*`` in
   metrics.jsonl, with device syncs): data wait, augmentation, forward+backward (DDP's gradient
   all-reduce overlaps the backward and is inside it), optimizer, and the per-step stop-flag
   all-reduce. Target: everything but forward+backward <= 10% of the step.
2. **Throughput**: MoCo v2 steps (query forward+backward, key forward, SGD) on random 64x64x5 views,
   images/s for ResNet-18 and ResNet-50 (Hayat stem), fp32 against bf16 autocast, contiguous against
   channels_last, and torch.compile with ``--compile``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslsky.machine import describe_machine  # noqa: E402
from sslsky.methods import MoCo  # noqa: E402
from sslsky.models import build_encoder  # noqa: E402
from sslsky.train.pretrain import METRICS_FILE  # noqa: E402


def sslsky(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sslsky", *args], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def step_split(work: Path, steps: int, batch: int, device: str) -> None:
    mock, packed, run = work / "mock", work / "packed", work / "run"
    sslsky("mock", "--survey", "sdss", "--n", str(4 * batch + 64), "--seed", "2", "--out", str(mock), "progress=false")
    sslsky("pack", "--catalog", str(mock / "catalog.fits"), "--out", str(packed), "progress=false")
    warm = 3
    log_every = steps
    sslsky("pretrain", "--config", str(REPO / "config" / "pretrain_sdss.yaml"), f"data.path={packed}",
           f"run_dir={run}", "model.arch=resnet18", f"data.batch_size={batch}", "data.num_workers=2",
           f"model.moco.queue_size={batch * 32}", f"optim.total_steps={warm + steps}", f"log_every={log_every}",
           "val_every=0", f"checkpoint_every={10 * (warm + steps)}", "tensorboard=false", "progress=false",
           f"device={device}", f"optim.warmup_steps={warm}",
           "channels_last=" + ("true" if device == "cuda" else "false"))
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]  # the window after the first log: warm-up excluded
    parts = {key[5:]: value for key, value in last.items() if key.startswith("time_")}
    total = sum(parts.values())
    print(f"\n== step split: trainer, ResNet-18 (Hayat stem), SDSS 107x107x5 -> 64x64, batch {batch}, "
          f"{device}, 1 process, mean of {log_every} steps")
    for name, value in parts.items():
        print(f"  {name:18s} {1e3 * value:8.1f} ms  {100 * value / total:5.1f} %")
    other = total - parts["forward_backward"]
    print(f"  {'total':18s} {1e3 * total:8.1f} ms  ({last['images_per_s']:.0f} images/s); "
          f"not forward+backward: {100 * other / total:.1f} % (target <= 10 %)")


def throughput(arch: str, batch: int, steps: int, device: torch.device, amp: bool, channels_last: bool,
               compile_model: bool) -> float:
    torch.manual_seed(0)
    model = MoCo(build_encoder(arch, 5, "hayat"), dim=128, queue_size=batch * 16).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compile_model else model
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    q = torch.randn(batch, 5, 64, 64, device=device).contiguous(memory_format=fmt)
    k = torch.randn(batch, 5, 64, 64, device=device).contiguous(memory_format=fmt)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = net({"view1": q, "view2": k})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step(1, 10)

    for _ in range(3 if not compile_model else 5):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="batch per step (default: 32 on CPU, 256 on GPU)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 5 on CPU, 50 on GPU)")
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--skip-split", action="store_true", help="only the throughput table")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (256 if gpu else 32)
    steps = args.steps or (50 if gpu else (2 if args.quick else 5))
    print(f"bench_pretrain on {describe_machine()}, device {device}, {torch.get_num_threads()} threads")

    if not args.skip_split:
        with tempfile.TemporaryDirectory() as tmp:
            step_split(Path(tmp), steps=(10 if args.quick else 30) if not gpu else 100, batch=batch,
                       device=device.type)

    print(f"\n== MoCo v2 training images/s at 64x64x5, Hayat stem, batch {batch}, {steps} timed steps")
    variants = [("fp32", False, False, False), ("fp32 channels_last", False, True, False),
                ("bf16", True, False, False), ("bf16 channels_last", True, True, False)]
    if args.compile:
        variants.append(("bf16 channels_last compile", True, True, True))
    for arch in args.archs.split(","):
        base = None
        for name, amp, cl, comp in variants:
            rate = throughput(arch, batch, steps, device, amp, cl, comp)
            base = base or rate
            print(f"  {arch:9s} {name:28s} {rate:9.1f} images/s  ({rate / base:.2f}x fp32)", flush=True)


if __name__ == "__main__":
    main()
