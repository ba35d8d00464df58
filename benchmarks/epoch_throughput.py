"""A whole DeepCluster epoch: ours against the conventional design at its best, side by side.

    PYTHONPATH=ssl .venv/bin/python benchmarks/epoch_throughput.py --setting paper      # AlexNet+Sobel, 224 px
    PYTHONPATH=ssl .venv/bin/python benchmarks/epoch_throughput.py --setting small      # smallconv, 28 px

An epoch is everything the algorithm does once per clustering: embed every image, PCA-whiten,
L2-normalise and k-means them, draw images uniformly over clusters, train one pass on the
pseudo-labels with a fresh head, save a checkpoint. Both sides run DeepCluster (v1) with the same
initial weights, k, batch size, SGD settings, crops and flips, on the same image files.

OURS is the library's own loop (`train.train`, one call for all the epochs, as a user runs it):
images decoded once into a uint8 cache, crops and flips as one batched resample, bf16 autocast
where the CPU has fast bf16, channels_last, fused SGD. CONVENTIONAL is the reference DeepCluster's
design at its best: a DataLoader of PIL-decoded files with torchvision.transforms.v2 per sample,
persistent workers (the sampler's indices are swapped each epoch), the worker count tuned on this
machine, torch's default SGD, fp32 NCHW as the reference trains. The same clustering code serves
both (its cost against raw faiss is the `kmeans` line). Sides alternate epoch by epoch so both see
the machine's noise (each conventional epoch runs inside ours' per-epoch callback, so it also gets
the heap reuse that `train` turns on); the medians are reported. The last line is `speedup X.XX`:
conventional epoch time / ours.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from machine import uptime
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from deepcluster.cluster import cluster_features
from deepcluster.config import Params, params_from_dict
from deepcluster.data import build_cache, load_cache, scan_images
from deepcluster.device import autocast, bf16_enabled, heap_reuse, set_threads
from deepcluster.embed import ImageSource, compute_features
from deepcluster.models import build_model
from deepcluster.sample import export_digits
from deepcluster.sampler import uniform_over_clusters
from deepcluster.train import data_statistics, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "epoch_throughput.json"
SETTINGS = {
    "paper": {"model": {"arch": "alexnet", "sobel": True}, "data": {"resolution": 224},
              "train": {"batch_size": 64}, "augment": {"hflip": True, "crop_scale": [0.08, 1.0]}},
    "small": {"model": {"arch": "smallconv"}, "data": {"resolution": 28},
              "train": {"batch_size": 128}, "augment": {"crop_scale": [0.3, 1.0]}},
}  # fmt: skip


def make_dataset(root: Path, n_images: int) -> None:
    """`n_images` digits as PNG files: the first ones, or all of them replicated (same pixels,
    different bytes) up to that number."""
    export_digits(root / "digits")
    originals = sorted((root / "digits").rglob("*.png"))
    for extra in originals[n_images:]:  # fewer than the 1,797 digits asked for
        extra.unlink()
    for i in range(max(0, n_images - len(originals))):
        src = originals[i % len(originals)]
        dst = root / f"copy{i // len(originals) + 1}" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        data, text = src.read_bytes(), f"copy\0{i}".encode()
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text
        chunk += struct.pack(">I", zlib.crc32(b"tEXt" + text))
        dst.write_bytes(data[:33] + chunk + data[33:])  # after the signature and IHDR


def bench_params(setting: str, k: int) -> Params:
    raw = copy.deepcopy(SETTINGS[setting])
    raw["model"]["method"] = "deepcluster"  # the reference algorithm, on both sides
    raw["cluster"] = {"k": k, "pca_dim": 64}
    raw["train"] |= {"epochs": 1000, "schedule": "constant", "warmup_epochs": 0}
    raw["augment"] |= {"jitter": 0.0, "blur": 0.0, "solarize": 0.0}  # the paper's augmentation
    return params_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# The conventional side


class Files(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), i


class Swappable(Sampler):
    """The epoch's draw; its indices change between epochs while the workers persist."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class Conventional:
    """The reference design: two DataLoaders (plain for features, augmented for training)."""

    def __init__(self, params: Params, paths: list[Path], workers: int, images: np.ndarray):
        self.params, self.workers = params, workers
        side = params.data.resolution
        plain = v2.Compose([v2.Resize(side), v2.CenterCrop(side), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True)])  # fmt: skip
        a = params.augment
        crop = [v2.RandomResizedCrop(side, scale=tuple(a.crop_scale), antialias=True)]
        flip = [v2.RandomHorizontalFlip()] if a.hflip else []
        tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        self.sampler = Swappable()
        options = {"batch_size": params.train.batch_size, "num_workers": workers,
                   "persistent_workers": workers > 0}  # fmt: skip
        self.plain = DataLoader(Files(paths, plain), shuffle=False, **options)
        self.augmented = DataLoader(Files(paths, v2.Compose(crop + flip + tensor)),
                                    sampler=self.sampler, **options)  # fmt: skip
        torch.manual_seed(params.train.seed)
        self.model = build_model(params.model, [params.cluster.k])
        self.model.normalize.set(*data_statistics(images))
        t = params.train
        body = [p for n, p in self.model.named_parameters() if not n.startswith("heads.")]
        self.opt = torch.optim.SGD(body, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.gen = torch.Generator().manual_seed(t.seed)

    @torch.no_grad()
    def features(self) -> np.ndarray:
        self.model.eval()
        return np.concatenate([self.model.embed(x).numpy() for x, _ in self.plain])

    def epoch(self, checkpoint: Path) -> None:
        p, t = self.params, self.params.train
        c = cluster_features(self.features(), p.cluster.k, p.cluster.pca_dim, seed=t.seed)
        indices, _ = uniform_over_clusters(c.assignments, len(c.assignments), self.gen)
        self.sampler.indices = indices.tolist()
        labels = torch.from_numpy(c.assignments)
        self.model.reset_heads([c.k])
        head = torch.optim.SGD(self.model.heads.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.model.train()
        for x, i in self.augmented:
            if len(x) < 2:
                continue
            loss = F.cross_entropy(self.model(x), labels[i])
            self.opt.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            head.step()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict()}, checkpoint)


def tune_workers(params: Params, paths: list[Path], images: np.ndarray, work: Path) -> dict:
    """Seconds of one conventional epoch over the first 256 images with 0..3 workers, the
    workers already started (a second epoch); the fastest count wins. A whole epoch, not a few
    training steps: the workers compete with the training threads for the cores."""
    n = min(len(paths), 256)
    seconds = {}
    for workers in (0, 1, 2, 3):
        side = Conventional(params, paths[:n], workers, images[:n])
        side.epoch(work / "tuning.pt")
        began = time.perf_counter()
        side.epoch(work / "tuning.pt")
        seconds[workers] = time.perf_counter() - began
    return seconds


# ---------------------------------------------------------------------------------------------
# Measuring


def gemm_peak(dtype: torch.dtype) -> float:
    """The best FLOP/s of large matrix products on this machine (what MFU is measured against).
    oneDNN's bf16 convolutions can beat torch's bf16 matrix product here, so an MFU a little over
    100% is possible."""
    best = 0.0
    for size in (1024, 2048, 4096):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        began, n = time.perf_counter(), 0
        while time.perf_counter() - began < 1.0:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - began))
    return best


def network_seconds(params: Params, n_images: int, repeats: int = 5) -> float:
    """Seconds ours' network alone needs for an epoch of `n_images`: the training steps (forward
    and backward) and the features pass on ready-made batches, as `train` runs them (bf16,
    channels_last, heap reuse), with no data, no optimiser, no clustering."""
    cpu = torch.device("cpu")
    model = build_model(params.model, [params.cluster.k]).to(memory_format=torch.channels_last)
    side, k = params.data.resolution, params.cluster.k

    def batch(n: int) -> torch.Tensor:
        return torch.rand(n, 3, side, side).contiguous(memory_format=torch.channels_last)

    x, y, plain = batch(params.train.batch_size), torch.randint(k, (params.train.batch_size,)), batch(256)

    def step() -> None:
        with autocast(cpu, True):
            loss = F.cross_entropy(model.train()(x), y)
        loss.backward()

    @torch.no_grad()
    def features() -> None:
        with autocast(cpu, True):
            model.eval().embed(plain)

    per_image = 0.0
    with heap_reuse():
        for work, size in ((step, len(x)), (features, len(plain))):
            work()  # warm-up
            seconds = []
            for _ in range(repeats):
                began = time.perf_counter()
                work()
                seconds.append(time.perf_counter() - began)
            per_image += min(seconds) / size  # its best: a bound, not a typical time
    return per_image * n_images


def training_flops(params: Params, images: int) -> float:
    """Multiply-adds x 2 of one epoch's network work: features pass (forward) and training
    pass (forward + backward = 3 forwards), counted with torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(params.model, [params.cluster.k])
    x = torch.rand(2, 3, params.data.resolution, params.data.resolution)
    with FlopCounterMode(display=False) as counter:
        model(x)
    per_image = counter.get_total_flops() / 2
    return per_image * images * (1 + 3)


def kmeans_seconds(params: Params, feats: np.ndarray, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of our clustering step and of raw faiss (PCA-whitening, L2, k-means, the
    assignment) on the same features, alternating."""
    c, seed = params.cluster, params.train.seed
    ours, raw = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        cluster_features(feats, c.k, c.pca_dim, c.kmeans_iters, c.kmeans_redo, seed)
        ours.append(time.perf_counter() - began)
        began = time.perf_counter()
        pca = faiss.PCAMatrix(feats.shape[1], c.pca_dim, -0.5)
        pca.train(feats)
        x = pca.apply(feats)
        faiss.normalize_L2(x)
        kmeans = faiss.Kmeans(x.shape[1], c.k, niter=c.kmeans_iters, seed=seed)
        kmeans.cp.max_points_per_centroid = 10_000_000
        kmeans.train(x)
        kmeans.index.search(x, 1)
        raw.append(time.perf_counter() - began)
    return statistics.median(ours), statistics.median(raw)


def kmeans_lines(params: Params, feats: np.ndarray, rows: int = 20_000) -> list[str]:
    """The clustering step against raw faiss: on the epoch's features, and on `rows` rows made
    of them plus 1% noise, where the timings are not timer noise."""
    noise = np.random.default_rng(0).normal(0, 0.01 * feats.std(), (rows, feats.shape[1]))
    larger = (feats[np.arange(rows) % len(feats)] + noise).astype(np.float32)
    lines = []
    for x in (feats, larger):
        ours, raw = kmeans_seconds(params, x)
        lines.append(f"kmeans {x.shape[0]:,} x {x.shape[1]}: ours {ours:.3f}s vs raw faiss "
                     f"{raw:.3f}s = {ours / raw:.2f}x")  # fmt: skip
    return lines


def alternate(params: Params, images: np.ndarray, work: Path, conventional, repeats: int) -> dict:
    """Epoch seconds of both sides, alternating. Ours is one `train` call, as a user runs it; the
    conventional epoch runs inside its per-epoch callback (after ours has saved its checkpoint),
    and the time spent there is not counted as ours. The first round warms both up."""
    times: dict[str, list[float]] = {"ours": [], "conventional": []}
    mark = [time.perf_counter()]

    def conventional_epoch(stats) -> None:
        ours = time.perf_counter() - mark[0]
        began = time.perf_counter()
        conventional.epoch(work / "conventional.pt")
        theirs = time.perf_counter() - began
        print(f"epoch {stats.epoch - 1}: ours {ours:.1f}s, conventional {theirs:.1f}s", flush=True)
        if stats.epoch > 1:
            times["ours"].append(ours)
            times["conventional"].append(theirs)
        mark[0] = time.perf_counter()

    train(params, images, work / "ours", on_epoch=conventional_epoch, stop_after=repeats + 1,
          progress=False)  # fmt: skip
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=SETTINGS, default="paper")
    p.add_argument("--images", type=int, default=1797)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: auto)")
    args = p.parse_args()
    params = bench_params(args.setting, args.k)
    threads = set_threads(args.threads or "auto")
    print(f"{args.setting}: {params.model.arch}, sobel {params.model.sobel}, "
          f"{params.data.resolution} px, batch {params.train.batch_size}, k {args.k}, "
          f"{args.images} images, {threads} torch threads; bf16 on ours: "
          f"{bf16_enabled(torch.device('cpu'), True)}", flush=True)  # fmt: skip
    print(f"before: {uptime()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="epoch-") as tmp:
        work = Path(tmp)
        make_dataset(work / "images", args.images)
        with contextlib.redirect_stderr(io.StringIO()):
            manifest, _ = scan_images(work / "images")
            build_cache(work / "images", manifest, params.data.resolution, work / "cache.npy")
        images = load_cache(work / "cache.npy")
        paths = [work / "images" / path for path in manifest["path"]]
        tuning = tune_workers(params, paths, images, work)
        workers = min(tuning, key=tuning.get)
        print("conventional workers tuned: " + ", ".join(
            f"{w}: {s:.1f}s" for w, s in tuning.items()) + f" an epoch of 256 images -> {workers}", flush=True)
        conventional = Conventional(params, paths, workers, images)
        times = alternate(params, images, work, conventional, args.repeats)
        source = ImageSource(images, torch.device("cpu"))
        feats = compute_features(conventional.model, source, 256, amp=False, progress=False)
        kmeans = kmeans_lines(params, feats)
    med = {side: statistics.median(values) for side, values in times.items()}
    flops = training_flops(params, args.images)
    peaks = {"bf16": gemm_peak(torch.bfloat16), "fp32": gemm_peak(torch.float32)}
    ours_peak = peaks["bf16"] if bf16_enabled(torch.device("cpu"), True) else peaks["fp32"]
    mfu = {"ours": flops / med["ours"] / ours_peak, "conventional": flops / med["conventional"] / peaks["fp32"]}
    print(f"\n{'':14}{'epoch s':>9}{'images/s':>10}{'MFU':>7}")
    for side in ("ours", "conventional"):
        print(f"{side:14}{med[side]:>9.1f}{args.images / med[side]:>10.1f}{mfu[side]:>7.1%}")
    print(f"GEMM peak: bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s"
          f" (MFU: network FLOPs of the epoch / epoch time / the side's precision's peak)")
    network = network_seconds(params, args.images)
    ceiling = med["conventional"] / network
    print(f"ceiling {ceiling:.2f}: the speedup if ours spent nothing outside the network "
          f"({network:.1f}s an epoch), against the conventional side as measured")  # fmt: skip
    print("\n".join(kmeans))
    print(f"after: {uptime()}")
    entry = {"setting": args.setting, "images": args.images, "k": args.k, "threads": threads,
             "workers": workers, "tuning": tuning, "seconds": times, "median": med, "mfu": mfu,
             "gemm_peak": peaks, "network_seconds": network, "ceiling": ceiling, "kmeans": kmeans, "uptime": uptime()}  # fmt: skip
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**saved, args.setting: entry}, indent=1) + "\n")
    print(f"speedup {med['conventional'] / med['ours']:.2f}")


if __name__ == "__main__":
    main()
