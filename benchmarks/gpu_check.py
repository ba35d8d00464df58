"""One check of the library on a GPU machine as it is lent (torch + numpy, carried wheels): one JSON.

    make gpu-wheels                                     # here: the wheels the loop needs, .gpu-wheels/
    python3 benchmarks/gpu_check.py --out $OUT          # there (docs/benchmarks.md, "GPU check")
    PYTHONPATH=ssl .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny   # here, < 2 min

Sections: the machine, the bf16 matmul peak, training and features images/s of the library's own
loop parts (AlexNet 224 px v1, smallconv 28 px v2) with MFU, k-means 100k x 256 -> 10k, and two
epochs of `train.train` on the bundled 8x8 digits (trained NMI against the random-init network's).
Each section is timed and guarded: a failure is recorded in its entry and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"  # `make gpu-wheels`
DIGITS = ROOT / "benchmarks" / "gpu_check_digits.npz"  # scikit-learn's 1,797 digits, 8x8 uint8
sys.path.insert(0, str(ROOT / "ssl"))  # the library from this checkout, installed or not

# import name -> distribution: what the training loop imports that a bare torch machine may lack.
# The pydantic group goes in together when pydantic is missing: a machine's older typing_extensions
# can lack what this pydantic needs, and the carried one is put first on sys.path.
PYDANTIC_GROUP = {
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "typing_extensions": "typing-extensions",
}
OTHERS = {"yaml": "pyyaml", "tqdm": "tqdm", "kornia": "kornia", "kornia_rs": "kornia-rs"}
SMOKE_EPOCHS = 2

# (full, tiny) sizes; tiny runs every section on a laptop CPU in well under two minutes
SIZES = {
    "matmul": ([4096, 8192, 16384], [256, 512]),
    "alexnet": ({"n": 8192, "batch": 256, "side": 224, "k": 100}, {"n": 8, "batch": 4, "side": 64, "k": 2}),
    "smallconv": ({"n": 65536, "batch": 256, "side": 28, "k": 1000}, {"n": 128, "batch": 32, "side": 28, "k": 20}),
    "kmeans": ({"n": 100_000, "d": 256, "k": 10_000}, {"n": 2000, "d": 32, "k": 50}),
}  # fmt: skip


def module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def install_missing(wheels: Path | None) -> dict:
    """pip-install from the carried wheels, into a temporary folder put first on sys.path, the
    modules this machine lacks; before torch is imported, so the carried versions are the ones used."""
    wanted = dict(PYDANTIC_GROUP) if module_missing("pydantic") else {}
    wanted |= {m: d for m, d in OTHERS.items() if module_missing(m)}
    report: dict = {"missing": sorted(wanted), "installed": []}
    if not wanted or wheels is None or not wheels.is_dir():
        report["note"] = "nothing to install" if not wanted else f"no wheels folder {wheels}"
        return report
    target = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--find-links", str(wheels), "--target", str(target)]  # fmt: skip
    dists = sorted(set(wanted.values()))
    if subprocess.run([*pip, *dists], capture_output=True, check=False).returncode != 0:
        for dist in dists:  # one at a time: a wheel that is missing costs only its own package
            one = subprocess.run([*pip, dist], capture_output=True, text=True, check=False)
            if one.returncode != 0:
                report.setdefault("failed", {})[dist] = one.stderr.strip().splitlines()[-1:]
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    report["installed"] = sorted(m for m in wanted if not module_missing(m))
    return report


# ---------------------------------------------------------------------------------------------
# sections: each returns a dict of figures


def machine(device) -> dict:
    import numpy as np
    import torch
    from machine import FLAGS, cpu  # benchmarks/machine.py: the CPU flags that decide the kernels

    host = cpu()
    model = host["model"]
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else model,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": {f: f in host["flags"] for f in FLAGS},
        "faiss": not module_missing("faiss"),
        "kornia": not module_missing("kornia"),
    }
    if device.type == "cuda":
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return out


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits: tiny CPU figures do not round to 0."""
    return float(f"{x:.{digits}g}")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device, min_seconds: float = 0.3) -> float:
    """Seconds per call: repeated (doubling) until the batch of calls lasts `min_seconds`."""
    fn()
    sync(device)
    reps = 1
    while True:
        began = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        spent = time.perf_counter() - began
        if spent >= min_seconds or reps >= 1024:
            return spent / reps
        reps *= 2


def matmul_peak(device, sizes: list[int]) -> dict:
    """bf16 square matmuls: the best TFLOP/s over the sizes, the MFU denominator below."""
    import torch

    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        seconds = timed(lambda a=a, b=b: torch.mm(a, b), device)
        by_size[str(n)] = sig(2 * n**3 / seconds / 1e12)
        del a, b
    return {"tflops_by_size": by_size, "tflops": max(by_size.values())}


def loop_params(arch: str, size: dict, device, photometric: bool):
    """Resolved params of the paper's AlexNet (v1, Sobel, 224 px) or the default small net (v2)."""
    from deepcluster.config import params_from_dict

    if arch == "alexnet":
        model = {"method": "deepcluster", "arch": "alexnet", "sobel": True}
        augment = {"hflip": True, "crop_scale": [0.08, 1.0]}
    else:
        model = {"method": "deepcluster-v2", "arch": "smallconv", "sobel": False}
        augment = {}
    if not photometric:
        augment |= {"jitter": 0.0, "grayscale": 0.0, "blur": 0.0, "solarize": 0.0}
    k = size["k"]
    return params_from_dict({
        "data": {"resolution": size["side"]},
        "model": model,
        "cluster": {"k": k, "pca_dim": min(64, k), "super_clusters": 1, "reassign_every": 1},
        "train": {"epochs": 1, "batch_size": size["batch"]},
        "augment": augment,
        "compute": {"device": device.type, "amp": True},
    })  # fmt: skip


def stopwatch(fn: Callable[[], object], device) -> tuple[object, float]:
    """fn's result and its seconds, the device's queued work included."""
    began = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - began


def loop_parts(params, images, device):
    """The method, model, image source and epoch trainer exactly as `train.train` builds them."""
    from deepcluster import augment as aug
    from deepcluster import distributed as dist
    from deepcluster import methods
    from deepcluster.embed import ImageSource
    from deepcluster.train import EpochTrainer, _build

    method = methods.for_params(params)
    model, optimizer, generator = _build(params, images, device, dist.ONE)
    source = ImageSource(images, device)
    photo = aug.photometric(params.augment, True, images.shape[-1])
    trainer = EpochTrainer(method, model, optimizer, source, params, generator, photo, dist.ONE)
    return method, model, source, trainer


def training(arch: str, size: dict, device, peak_tflops: float | None, photometric: bool) -> dict:
    """Images/s of one SGD pass of the library's loop (its `EpochTrainer`, method, augmentation and
    model; random uint8 images resident on the device), of the features pass, and the MFU: FLOPs
    counted over the warm-up pass (forward and backward) against the bf16 matmul peak."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deepcluster import distributed as dist
    from deepcluster import methods
    from deepcluster.embed import compute_features, eval_batch_size
    from deepcluster.resume import LoopState

    params = loop_params(arch, size, device, photometric)
    n, rng = size["n"], np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, size["side"], size["side"]), dtype=np.uint8)
    method, model, source, trainer = loop_parts(params, images, device)
    batch = eval_batch_size(params)
    _, first_features = stopwatch(lambda: compute_features(model, source, batch, True, False), device)
    feats, features_seconds = stopwatch(lambda: compute_features(model, source, batch, True, False), device)  # fmt: skip
    ctx = methods.Context(model, source, params, lambda: feats, dist.ONE)
    state = LoopState()
    clusterings, cluster_seconds = stopwatch(lambda: method.cluster(ctx, state, 0), device)
    with FlopCounterMode(display=False) as counter:
        stopwatch(lambda: trainer.run(clusterings, state, progress=False), device)
    flops_per_image = counter.get_total_flops() / n
    (loss, _), seconds = stopwatch(lambda: trainer.run(clusterings, state, progress=False), device)
    out = {
        "method": params.model.method,
        "images": n,
        "batch_size": size["batch"],
        "resolution": size["side"],
        "photometric": photometric,
        "resident_on_device": source.resident is not None,
        "train_images_per_s": round(n / seconds, 1),
        "train_epoch_seconds": round(seconds, 3),
        "train_gflop_per_image": round(flops_per_image / 1e9, 3),
        "train_tflops": sig(n / seconds * flops_per_image / 1e12),
        "features_images_per_s": round(n / features_seconds, 1),
        "features_first_pass_seconds": round(first_features, 3),
        "cluster_seconds": round(cluster_seconds, 3),
        "loss": round(float(loss), 4),
    }  # fmt: skip
    if peak_tflops:
        out["mfu"] = sig(n / seconds * flops_per_image / 1e12 / peak_tflops)
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def kmeans_section(device, size: dict) -> dict:
    """k-means through `cluster.kmeans` (faiss where it runs on this device, else torch_kmeans),
    20 iterations, on unit vectors with some structure; and raw faiss beside it when installed."""
    import numpy as np

    from deepcluster import cluster

    n, d, k = size["n"], size["d"], size["k"]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((k // 10, d)).astype(np.float32)
    x = cluster.l2_normalize(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32))  # fmt: skip
    use_gpu = device.type == "cuda"
    backend = cluster._torch_device(use_gpu)
    began = time.perf_counter()
    centroids, loss = cluster.kmeans(x, k, iters=20, seed=0, use_gpu=use_gpu)
    seconds = time.perf_counter() - began
    ids, _ = cluster.assign(x, centroids, use_gpu)
    out = {
        "n": n, "d": d, "k": k, "iters": 20,
        "backend": "faiss" if backend is None else f"torch_kmeans on {backend}",
        "seconds": round(seconds, 3),
        "loss": round(float(loss), 4),
        "empty_clusters": int(k - np.unique(ids).size),
    }  # fmt: skip
    if not module_missing("faiss"):
        import faiss

        began = time.perf_counter()
        km = faiss.Kmeans(d, k, niter=20, seed=1, gpu=use_gpu and cluster.gpu_available(),
                          max_points_per_centroid=10_000_000)  # fmt: skip
        km.train(x)
        out["faiss_seconds"] = round(time.perf_counter() - began, 3)
        out["faiss_gpu"] = bool(use_gpu and cluster.gpu_available())
    return out


def smoke_params(device):
    """v1's defaults for the 1,797 grey digits as `autoparams` resolves them (16 px, k = 72, batch
    32), for two epochs: no warm-up epoch (it would spend half the budget at a low rate) and no
    photometric augmentation (kornia may be missing; the margins below were measured without)."""
    from deepcluster import autoparams
    from deepcluster.config import params_from_dict

    raw = {
        "model": {"method": "deepcluster"},
        "train": {"epochs": SMOKE_EPOCHS, "warmup_epochs": 0},
        "augment": {"jitter": 0.0, "grayscale": 0.0, "blur": 0.0, "solarize": 0.0},
        "compute": {"device": device.type},
    }
    facts = autoparams.DataFacts(images=1797, median_side=8, colour=False)
    resolved, _ = autoparams.resolve(params_from_dict(raw), facts)
    return resolved


def smoke_images(side: int):
    """The bundled digits as the cache holds them: N x 3 x side x side uint8, grey."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    with np.load(DIGITS) as z:
        pixels, labels = z["images"], z["labels"].astype(np.int64)
    x = torch.from_numpy(pixels).float()[:, None]
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return np.ascontiguousarray(x.numpy()), labels


def smoke_nmi(model, images, labels, params, device) -> tuple[float, float]:
    """NMI with the labels of the model's features clustered as training clusters them (k = 72),
    and at k = classes as the evaluation does (PCA-whitened to the auto dimension, best of 20)."""
    import numpy as np

    from deepcluster import autoparams
    from deepcluster.cluster import cluster_as_trained, cluster_features, nmi
    from deepcluster.embed import ImageSource, compute_features

    gpu = device.type == "cuda"
    feats = compute_features(model, ImageSource(images, device), 256, params.compute.amp, False)
    as_trained = cluster_as_trained(feats, params, gpu).assignments
    k = int(np.unique(labels).size)
    pca_dim, _ = autoparams.pca_dim(k, feats.shape[1])
    seed = params.train.seed
    classes = cluster_features(feats, k, pca_dim, iters=30, redo=20, seed=seed, use_gpu=gpu)
    return nmi(labels, as_trained), nmi(labels, classes.assignments)


def learning_smoke(device, seeds: list[int]) -> dict:
    """Two epochs of `train.train` on the bundled digits: the features' NMI with the labels must
    rise above the random-init network's (the same network before its first step), both clustered
    the way training clusters. On this CPU (5 seeds) the rise was 0.029-0.052 at the training k;
    at k = 10 it was 0.005-0.11 (k-means at k = 10 lands in other optima), so that is only recorded."""
    import torch

    from deepcluster import distributed as dist
    from deepcluster.train import _build, train

    runs = []
    for seed in seeds:
        params = smoke_params(device).replace("train", seed=seed)
        images, labels = smoke_images(params.data.resolution)
        initial, _, _ = _build(params, images, device, dist.ONE)  # train's own first network
        random_nmi = smoke_nmi(initial.eval(), images, labels, params, device)
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            result = train(params, images, Path(folder), labels=labels, progress=False)
        seconds = time.perf_counter() - began
        trained_nmi = smoke_nmi(result.model, images, labels, params, device)
        runs.append({
            "seed": seed,
            "nmi_random_init": round(random_nmi[0], 4),
            "nmi_trained": round(trained_nmi[0], 4),
            "nmi_k10_random_init": round(random_nmi[1], 4),
            "nmi_k10_trained": round(trained_nmi[1], 4),
            "loss_by_epoch": [round(h.loss, 4) for h in result.history],
            "nmi_labels_by_epoch": [round(h.nmi_labels, 4) for h in result.history],
            "train_seconds": round(seconds, 2),
        })  # fmt: skip
        del initial, result
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "images": len(images),
        "method": params.model.method,
        "epochs": SMOKE_EPOCHS,
        "resolution": int(params.data.resolution),
        "k": int(params.cluster.k),
        "batch_size": int(params.train.batch_size),
        "runs": runs,
        "learned": all(r["nmi_trained"] > r["nmi_random_init"] for r in runs),
    }


# ---------------------------------------------------------------------------------------------
# the run


class Report:
    """The JSON, rewritten atomically after every section: a run stopped half-way keeps its figures."""

    def __init__(self, path: Path, budget: float) -> None:
        self.path, self.budget, self.began = path, budget, time.perf_counter()
        self.data: dict = {"sections": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.began)

    def section(self, name: str, fn: Callable[[], dict], needs: float = 0.0) -> dict | None:
        if self.left() < needs:
            entry: dict = {"skipped": f"time budget: {self.left():.0f} s left, needs about {needs:.0f}"}
        else:
            began = time.perf_counter()
            try:
                entry = fn()
            except Exception as err:  # noqa: BLE001 -- recorded; the next section still runs
                tail = traceback.format_exc().strip().splitlines()[-6:]
                entry = {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": tail}
            entry["seconds"] = round(time.perf_counter() - began, 2)
            _free_memory()
        self.data["sections"][name] = entry
        print(f"{name}: {json.dumps(entry)[:400]}", flush=True)
        self.save()
        return entry

    def save(self) -> None:
        self.data["total_seconds"] = round(time.perf_counter() - self.began, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)  # atomic; deepcluster.io may not import here yet


def _free_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")),
                    help="folder of gpu_check.json, or the file itself (default: $OUT)")  # fmt: skip
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="small sizes: every section in seconds")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all sections")
    ap.add_argument("--wheels", default=str(WHEELS), help="carried wheels ('' installs none)")
    ap.add_argument("--seeds", type=int, default=None, help="learning smoke test runs (full: 3)")
    args = ap.parse_args(argv)
    out = args.out if args.out.suffix == ".json" else args.out / "gpu_check.json"
    report = Report(out, args.budget)
    report.data["started_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.data["wheels"] = install_missing(Path(args.wheels) if args.wheels else None)
    report.data["tiny"] = args.tiny

    from deepcluster.device import resolve_device

    device = resolve_device(args.device)
    pick = 1 if args.tiny else 0
    photometric = not module_missing("kornia")
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.tiny else 3)))
    report.section("machine", lambda: machine(device))
    peak = report.section("matmul_bf16", lambda: matmul_peak(device, SIZES["matmul"][pick]))
    tflops = (peak or {}).get("tflops")
    for arch in ("alexnet", "smallconv"):
        size = SIZES[arch][pick]
        report.section(f"train_{arch}", lambda a=arch, s=size: training(a, s, device, tflops, photometric), needs=20)  # fmt: skip
    report.section("kmeans", lambda: kmeans_section(device, SIZES["kmeans"][pick]), needs=10)
    report.section("learning_smoke", lambda: learning_smoke(device, seeds), needs=20)
    failed = [k for k, v in report.data["sections"].items() if "error" in v or "skipped" in v]
    report.data["failed_sections"] = failed
    report.save()
    print(f"wrote {out} ({report.data['total_seconds']} s); failed or skipped: {failed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
