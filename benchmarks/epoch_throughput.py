"""Training-epoch throughput: our decode-once, batched-on-device epoch vs a conventional one.

OURS is the real code path: `train_one_epoch` over `ImageSource(load_cache(...))`, i.e. images are
decoded once into a uint8 cache and each batch is cropped/flipped by one affine resample on the
training device. CONVENTIONAL is the usual PyTorch recipe: a `Dataset` that opens every file with
PIL and runs torchvision's RandomResizedCrop / RandomHorizontalFlip / ToImage / ToDtype / Normalize
per sample, behind a `DataLoader` with worker processes, built anew each epoch because the
pseudo-labels change (as the reference DeepCluster does).

Why it is fair: both sides start from the same weights (same seed), train on the same pseudo-labels
(one clustering of the untrained model's features, computed once and shared), draw the same number
of images per epoch with `uniform_over_clusters`, and use the same batch size, SGD settings (body with
momentum, fresh linear head every epoch), autocast/memory format, crop scale, flip setting, output
resolution and normalisation. Only the way pixels reach the model differs. Epochs are interleaved
(ours, conventional, ours, ...) so both sides share the machine's noise; the medians are reported.
The "data only" rows run the same input pipelines with no model, to show where the time goes.

    PYTHONPATH=ssl .venv/bin/python benchmarks/epoch_throughput.py --resolution 32 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import resource
import statistics
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from deepcluster import augment as aug
from deepcluster.cluster import Clustering, cluster_features
from deepcluster.config import Params, params_from_dict
from deepcluster.data import build_cache, load_cache, scan_images
from deepcluster.device import autocast, memory_format, resolve_device
from deepcluster.models import DeepClusterNet, build_model
from deepcluster.sample import export_digits
from deepcluster.sampler import uniform_over_clusters
from deepcluster.train import ImageSource, compute_features, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "epoch_throughput.json"


def make_dataset(root: Path, n_images: int | None) -> None:
    """Export the digits; replicate them into extra folders until there are `n_images` files.

    The ingest scan drops byte-identical files as duplicates, so each copy gets a PNG text chunk
    naming it: different bytes, same pixels.
    """
    export_digits(root / "digits")
    originals = sorted((root / "digits").rglob("*.png"))
    for i in range(max(0, (n_images or 0) - len(originals))):
        src = originals[i % len(originals)]
        dst = root / f"copy{i // len(originals) + 1}" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        data, text = src.read_bytes(), f"copy\0{i}".encode()
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text
        chunk += struct.pack(">I", zlib.crc32(b"tEXt" + text))
        dst.write_bytes(data[:33] + chunk + data[33:])  # after signature (8) + IHDR (25)


class FileDataset(Dataset):
    """The conventional dataset: open, decode and augment one image per call, on the CPU."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def conventional_transform(params: Params) -> v2.Compose:
    t = params.train
    steps = [v2.RandomResizedCrop(params.data.resolution, scale=t.crop_scale, antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if t.hflip else []
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.MEAN, aug.STD)]
    return v2.Compose(steps)


@dataclass
class Bench:
    params: Params
    device: torch.device
    source: ImageSource  # ours: the decoded uint8 cache
    dataset: FileDataset  # conventional: the image files, in the same (manifest) order
    clustering: Clustering  # the pseudo-labels both sides train on
    model: DeepClusterNet  # untrained; each side trains its own copy
    workers: int


def prepare(args: argparse.Namespace, work: Path) -> Bench:
    """Data, cache, params, initial weights and the one shared clustering."""
    # the library's defaults, not params.yaml: the pipeline's tuning must not move these figures
    train = {"batch_size": args.batch_size, "device": args.device}
    params = params_from_dict({"data": {"resolution": args.resolution}, "train": train})
    device = resolve_device(params.train.device)
    make_dataset(work, args.images)
    with contextlib.redirect_stderr(io.StringIO()):  # silence the ingest progress bars
        manifest, _ = scan_images(work)
        cache = build_cache(work, manifest, args.resolution, work / "cache.npy")
    source = ImageSource(load_cache(cache), device)
    torch.manual_seed(params.train.seed)
    model = build_model(params.model, params.cluster.k).to(
        device, memory_format=memory_format(device)
    )
    t, c = params.train, params.cluster
    feats = compute_features(model, source, t.batch_size, t.amp, progress=False)
    clustering = cluster_features(
        feats, c.k, c.pca_dim, c.kmeans_iters, c.kmeans_redo, t.seed, device.type == "cuda"
    )
    paths = [work / p for p in manifest["path"]]  # manifest order == cache row order
    dataset = FileDataset(paths, clustering.assignments, conventional_transform(params))
    return Bench(params, device, source, dataset, clustering, model, args.workers)


def new_side(b: Bench) -> tuple:
    """A copy of the initial weights with the training optimizer, and its own RNG."""
    t = b.params.train
    model = copy.deepcopy(b.model)
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.SGD(body, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return model, opt, torch.Generator().manual_seed(t.seed)


def ours_epoch(b: Bench, side: tuple) -> None:
    model, opt, gen = side
    lr = b.params.train.lr  # a constant rate, as on the conventional side
    train_one_epoch(model, opt, b.source, b.clustering, b.params, gen, lr=lr, progress=False)


def ours_data_only(b: Bench, side: tuple) -> None:
    """The input half of `train_one_epoch`: gather uint8 rows, normalise, batched crop/flip."""
    t, gen = b.params.train, side[2]
    indices, labels = uniform_over_clusters(b.clustering.assignments, len(b.source), gen)
    for start in range(0, len(indices), t.batch_size):
        idx = indices[start : start + t.batch_size]
        theta = aug.crop_flip_params(len(idx), t.crop_scale, t.hflip, gen)
        x = aug.normalize(b.source.batch(idx)).contiguous(memory_format=memory_format(b.device))
        aug.augment(x, theta)
        torch.from_numpy(labels[start : start + len(idx)]).to(b.device)


def conventional_batches(b: Bench, gen: torch.Generator):
    """(x, y) on the device from a DataLoader over the same kind of uniform-over-clusters draw."""
    indices, _ = uniform_over_clusters(b.clustering.assignments, len(b.dataset), gen)
    loader = DataLoader(  # built anew each epoch, like the reference DeepCluster's
        b.dataset,
        batch_size=b.params.train.batch_size,
        sampler=indices.tolist(),
        num_workers=b.workers,
        pin_memory=b.device.type == "cuda",
    )
    for x, y in loader:
        x = x.to(b.device, non_blocking=True).contiguous(memory_format=memory_format(b.device))
        yield x, y.to(b.device, non_blocking=True)


def conventional_epoch(b: Bench, side: tuple) -> None:
    """The same step as `train_one_epoch`: fresh head, cross-entropy, body SGD + head SGD."""
    (model, opt, gen), t = side, b.params.train
    model.reset_head(b.clustering.k)
    head_opt = torch.optim.SGD(model.head.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    model.train()
    for x, y in conventional_batches(b, gen):
        if len(x) < 2:  # batch norm needs two samples (ours skips these too)
            continue
        with autocast(b.device, t.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        head_opt.step()
        float(loss.detach())  # ours reads the loss every step too (a device sync on CUDA)


def conventional_data_only(b: Bench, side: tuple) -> None:
    for _ in conventional_batches(b, side[2]):
        pass


def measure(b: Bench, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per epoch of each job: a warm-up round, then `repeats` interleaved."""
    ours, conventional = new_side(b), new_side(b)
    jobs = {
        "ours": (ours_epoch, ours),
        "conventional": (conventional_epoch, conventional),
        "ours, data only": (ours_data_only, ours),
        "conventional, data only": (conventional_data_only, conventional),
    }
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for round_ in range(repeats + 1):
        for name, (job, side) in jobs.items():
            sync()
            wall, cpu = time.perf_counter(), cpu_seconds()
            job(b, side)
            sync()
            if round_ > 0:
                times["wall"].setdefault(name, []).append(time.perf_counter() - wall)
                times["cpu"].setdefault(name, []).append(cpu_seconds() - cpu)
    return times


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, joined at the
    end of each epoch). Unlike wall time it barely moves when other programs share the machine."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def machine_cpu_seconds() -> float:
    """CPU seconds used by every program on the machine (Linux), to see what else was running."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return 0.0
    ticks = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


def clocks() -> np.ndarray:
    """Wall seconds, our CPU seconds, the whole machine's CPU seconds."""
    return np.array([time.perf_counter(), cpu_seconds(), machine_cpu_seconds()])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def report(args: argparse.Namespace, b: Bench, times: dict, busy: float) -> None:
    """Print the table and ratios; merge this configuration's entry into the JSON results."""
    n, t = len(b.dataset), b.params.train
    med = {kind: {k: statistics.median(v) for k, v in d.items()} for kind, d in times.items()}
    ratios = {
        f"{kind}{part}": m[f"conventional{part}"] / m[f"ours{part}"]
        for kind, m in med.items()
        for part in ("", ", data only")
    }
    cuda = b.device.type == "cuda"
    device = torch.cuda.get_device_name(b.device) if cuda else f"cpu ({platform.machine()})"
    print(
        f"{n} images at {args.resolution}px, batch {t.batch_size}, {b.params.model.arch}, "
        f"k={b.clustering.k}, crop_scale={t.crop_scale}, hflip={t.hflip}, {device}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; conventional DataLoader num_workers="
        f"{b.workers}; median of {args.repeats} epochs after a warm-up; "
        f"other programs used {busy:.0%} of the CPUs meanwhile\n"
    )
    print(f"{'':25}{'wall s':>8}{'images/s':>10}{'CPU s':>8}   wall s of each epoch")
    for name, wall in med["wall"].items():
        each = " ".join(f"{s:.2f}" for s in times["wall"][name])
        print(f"{name:25}{wall:>8.2f}{n / wall:>10.0f}{med['cpu'][name]:>8.2f}   {each}")
    print(
        f"\nours is {ratios['wall']:.1f}x faster per epoch (conventional/ours wall time; "
        f"data pipeline alone {ratios['wall, data only']:.1f}x); "
        f"CPU time ratio {ratios['cpu']:.1f}x (data alone {ratios['cpu, data only']:.1f}x)"
    )
    if busy > 0.1:
        print("warning: other programs were using the CPUs; these timings are not representative")
    machine = {"cpu_count": os.cpu_count(), "device": device, "torch": torch.__version__,
               "torchvision": torchvision.__version__, "others_cpu_share": busy}  # fmt: skip
    config = {"images": n, "resolution": args.resolution, "batch_size": t.batch_size,
              "arch": b.params.model.arch, "device": b.device.type, "workers": b.workers}  # fmt: skip
    entry = {**config, "repeats": args.repeats, "seconds": times, "median_seconds": med,
             "ratio_conventional_over_ours": ratios, "params": b.params.to_dict(),
             "machine": machine}  # fmt: skip
    key = ",".join(f"{k}={v}" for k, v in config.items())  # one entry per configuration
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**saved, key: entry}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="replicate the 1,797 digits up to N")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=Params().train.batch_size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=2, help="conventional DataLoader num_workers")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="epoch-throughput-") as work:
        bench = prepare(args, Path(work))
        start = clocks()
        times = measure(bench, args.repeats)
        wall, own, machine = clocks() - start
        report(args, bench, times, max(0.0, machine - own) / (wall * (os.cpu_count() or 1)))


if __name__ == "__main__":
    main()
