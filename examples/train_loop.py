"""A few training steps of a toy model on a streamed DenseFusion dataset, with checkpoint and resume.

The model is a tiny conv image encoder predicting the caption's bag of words (hashed into 256 buckets), so the
example runs on a CPU in seconds; what it shows is the input side a real training script needs:

* ``densefusion_hf.loading.stream``: a shuffled ``datasets.IterableDataset`` (only the image and caption
  columns are read; each node takes its part when RANK / WORLD_SIZE are set, as torchrun does);
* ``densefusion_hf.loading.dataloader``: images decoded in the worker processes, batches of
  (float images [B, 3, S, S] in 0..1, captions);
* ``set_epoch`` at each epoch, for another shuffle order;
* ``--save-state``: model, optimizer and data position in one file; ``--resume-from`` continues from it.

    df-hf build builders/demo.yaml --workdir work/densefusion-demo        # makes the default dataset
    python examples/train_loop.py --steps 4 --save-state /tmp/state.pt
    python examples/train_loop.py --steps 8 --resume-from /tmp/state.pt

``--dataset`` takes a folder, a Hub dataset repo id or a short name (``densefusion-1m``...).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from densefusion_hf.loading import dataloader, stream

VOCAB = 256
DEMO_DATASET = "work/densefusion-demo/dataset"


class ToyCaptioner(nn.Module):
    """Image -> logits over hashed caption words."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, vocab)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def bag_of_words(captions: list[str], vocab: int = VOCAB) -> torch.Tensor:
    """Multi-hot targets; crc32 rather than hash(), which differs between processes."""
    target = torch.zeros(len(captions), vocab)
    for row, caption in enumerate(captions):
        for word in re.findall(r"[a-z0-9]+", caption.lower()):
            target[row, zlib.crc32(word.encode()) % vocab] = 1.0
    return target


def loader_state(loader, dataset):
    """The data position to checkpoint: the StatefulDataLoader's, else the dataset's (no workers only)."""
    if hasattr(loader, "state_dict"):
        return {"loader": loader.state_dict()}
    if loader.num_workers == 0:
        return {"dataset": dataset.state_dict()}
    print("note: without torchdata the data position cannot be saved with workers; "
          "a resumed run starts the epoch again", file=sys.stderr)
    return {}


def restore_position(loader, dataset, saved: dict) -> None:
    if "loader" in saved and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(saved["loader"])
    elif "dataset" in saved and loader.num_workers == 0:
        dataset.load_state_dict(saved["dataset"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=DEMO_DATASET,
                        help="folder, Hub repo id or short name (default: the demo build's folder)")
    parser.add_argument("--config", default="densefusion-demo", help="dataset config (default densefusion-demo)")
    parser.add_argument("--steps", type=int, default=10, help="stop after this many steps in all (default 10)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--save-state", type=Path, default=None, help="write a checkpoint here at the end")
    parser.add_argument("--resume-from", type=Path, default=None, help="continue from this checkpoint")
    args = parser.parse_args(argv)

    if args.dataset == DEMO_DATASET and not Path(DEMO_DATASET).exists():
        print(f"{DEMO_DATASET} does not exist: build the demo first "
              f"(df-hf build builders/demo.yaml --workdir work/densefusion-demo) or pass --dataset",
              file=sys.stderr)
        return 1

    torch.manual_seed(args.seed)
    model = ToyCaptioner()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    dataset = stream(args.dataset, args.config, columns=["image", "caption"], seed=args.seed,
                     shuffle_buffer=args.shuffle_buffer)
    loader = dataloader(dataset, args.batch_size, image_size=args.image_size, num_workers=args.num_workers)

    epoch, step = 0, 0
    if args.resume_from:
        saved = torch.load(args.resume_from, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        epoch, step = saved["epoch"], saved["step"]
        restore_position(loader, dataset, saved["data"])
        print(f"resumed at epoch {epoch} after step {step}")

    started = time.perf_counter()
    loss_fn = nn.BCEWithLogitsLoss()
    while epoch < args.epochs and step < args.steps:
        dataset.set_epoch(epoch)    # the loader's workers get the dataset, and its epoch, at each iter()
        for images, captions in loader:
            loss = loss_fn(model(images), bag_of_words(captions))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break
        else:
            epoch += 1      # the epoch ran to its end; a checkpoint taken now starts the next one
    print(f"{step} steps in {time.perf_counter() - started:.1f}s")

    if args.save_state:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "step": step, "data": loader_state(loader, dataset)}, args.save_state)
        print(f"saved {args.save_state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
