"""The registered model as MLflow runs it: images in; embedding and nearest learned centroid out.
`DeepClusterModel` loads from the library copy bundled with the model, without the evaluation or
plotting stack. It reads files only when allowed (`FileAccess`), checks every image against
`imagefile.ImageLimits` before decoding, and answers bad input in one line (`InputError`)."""

from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from .errors import UserError
from .imagefile import DECODE_ERRORS, ImageLimits, ImageRejected, decode_bytes, read_regular_file

SERVE_ROOT = "DEEPCLUSTER_SERVE_ROOT"
ALLOW_PATHS = "allow_paths"
# MLflow's scoring server sets this in its own process (mlflow.pyfunc.scoring_server.init)
MLFLOW_SERVING_FLAG = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
PREDICT_BATCH = 256
OUTPUT_COLUMNS = {"cluster": "int64", "distance": "float32", "embedding": "object"}
EXPECTED_INPUT = (
    "expected a list or Series of image paths or encoded image bytes, or a DataFrame with a "
    "`path` or an `image` column, e.g. pd.DataFrame({'image': [open('a.png', 'rb').read()]}), "
    "or ['a.png', 'b.png'] with params={'allow_paths': True}"
)

# The inputs are described for the registry and for callers, but MLflow must not enforce them: it
# would drop a plain list's unnamed column, base64-decode `image` before the size limits, and
# answer type errors by repeating the whole input. A signature "from type hints" is one MLflow
# leaves to the model to check (as_frame does, with EXPECTED_INPUT); a server then takes JSON
# `{"inputs": {"image": [...]}}`.
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "image", required=False),  # encoded image bytes, base64 over JSON
            ColSpec("string", "path", required=False),  # a file (allow_paths or a serve root)
        ]
    ),
    outputs=Schema(
        [
            ColSpec("long", "cluster"),
            ColSpec("float", "distance"),  # squared L2 to the centroid in the whitened space
            ColSpec(Array("float"), "embedding"),  # the network's embedding, as in features.npy
        ]
    ),
    params=ParamSchema([ParamSpec(ALLOW_PATHS, "boolean", False)]),
)
SIGNATURE._is_signature_from_type_hint = True


def input_example(encoded: bytes) -> dict[str, list[str]]:
    """One image as a server's caller sends it (MLflow keeps it as the model's serving example)."""
    return {"image": [base64.b64encode(encoded).decode("ascii")]}


_log = logging.getLogger(__name__)


class OneLineError(MlflowException):
    """An error that keeps its one line: MLflow's scoring server rewrites the message of an error
    from `predict` to `Failed to predict data '<the input>'. Error: ...`, repeating the caller's
    input (megabytes of base64) before the reason. `message` here is always the reason."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass  # set by MlflowException.__init__ and by the server's rewrite; args hold the reason


class InputError(OneLineError, UserError):
    """Bad input from the caller: HTTP 400 from a server, one line from the CLI."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class DeepClusterModel(mlflow.pyfunc.PythonModel):
    """Images -> embedding -> PCA-whitening + L2 -> nearest learned centroid."""

    def load_context(self, context) -> None:
        from .checkpoint import load_model
        from .cluster import Whitening

        ImageLimits.from_env()  # a bad limit stops a server at start, with its one line
        weights = Path(context.artifacts["model"])
        self.resolution = training_resolution(weights)
        self.net = load_model(weights, "cpu")
        with np.load(context.artifacts["clustering"], allow_pickle=False) as z:
            self.whitening, self.centroids = Whitening(A=z["A"], b=z["b"]), z["centroids"]

    # the pd.DataFrame hint keeps MLflow from converting or validating the input (it does neither
    # for DataFrame hints); a list, Series or dict is accepted just the same (`as_frame`)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        try:
            return self._predict(model_input, FileAccess.for_call(params))
        except InputError:
            raise
        except UserError as error:  # the operator's settings (limits), not the caller's input
            raise OneLineError(str(error), error_code=INTERNAL_ERROR) from None
        except Exception as error:  # a bug: no internals to the caller, all of them to the log
            _log.exception("prediction failed")
            raise OneLineError(
                "prediction failed: internal error (details in the model server's log)",
                error_code=INTERNAL_ERROR,
            ) from error

    def _predict(self, model_input, access: FileAccess) -> pd.DataFrame:
        import torch

        from .cluster import assign
        from .embed import ImageSource, compute_features

        frame = as_frame(model_input)
        if frame.empty:
            return pd.DataFrame({name: pd.Series(dtype=t) for name, t in OUTPUT_COLUMNS.items()})
        limits = ImageLimits.from_env()
        images = np.stack([self._decode(row, access, limits) for row in frame.itertuples()])
        source = ImageSource(images, torch.device("cpu"))
        feats = compute_features(self.net, source, PREDICT_BATCH, amp=False, progress=False)
        ids, dist = assign(self.whitening.apply(feats), self.centroids)
        return pd.DataFrame(
            {
                "cluster": ids.astype(np.int64),
                "distance": dist.astype(np.float32),
                "embedding": [row.tolist() for row in feats],
            }
        )

    def _decode(self, row, access: FileAccess, limits: ImageLimits) -> np.ndarray:
        """One row's image at the training resolution, exactly as ingest decodes files."""
        label = f"row {row.Index}"
        try:
            if _present(row.path):
                label = access.label(row.Index, row.path)
                data = access.read(row.path, limits)
            elif _present(row.image):
                data = _image_bytes(row.image, limits)
            else:
                raise ImageRejected("give a `path` or encoded `image` bytes")
            return decode_bytes(data, self.resolution, limits)
        except ImageRejected as rejection:
            raise InputError(f"{label}: {rejection}") from None
        except DECODE_ERRORS:
            raise InputError(f"{label}: not a decodable image") from None


def training_resolution(weights: Path) -> int:
    """The square side images were decoded to for training, as recorded in model.pt."""
    from .checkpoint import saved_params

    return saved_params(weights).data.resolution


# ---------------------------------------------------------------------------------------------
# Input: whatever the caller gave -> a frame with `path` and `image` columns


def as_frame(model_input) -> pd.DataFrame:
    """The input as rows of (path, image); InputError with EXPECTED_INPUT when it is neither."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, pd.Series) and model_input.name in ("path", "image"):
        frame = model_input.to_frame()
    elif isinstance(model_input, dict):
        try:
            frame = pd.DataFrame({key: _column(value) for key, value in model_input.items()})
        except ValueError:  # columns of different lengths
            raise InputError(f"{EXPECTED_INPUT}; got columns of different lengths") from None
    elif _records(model_input):  # JSON `{"inputs": [{"image": ...}, ...]}`
        frame = pd.DataFrame(list(model_input))
    elif isinstance(model_input, (str, bytes, os.PathLike)):
        return _unnamed([model_input])
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        if np.ndim(np.asarray(model_input, dtype=object)) > 1:
            raise InputError(f"{EXPECTED_INPUT}; got a nested list or array")
        return _unnamed(list(model_input))
    else:
        raise InputError(f"{EXPECTED_INPUT}; got {type(model_input).__name__}")
    if "path" in frame or "image" in frame:
        return frame.reindex(columns=["path", "image"]).reset_index(drop=True)
    if frame.shape[1] == 1:  # one unnamed column, e.g. pd.DataFrame(["a.png"])
        return _unnamed(frame.iloc[:, 0].to_list())
    if frame.empty:
        return _unnamed([])
    raise InputError(f"{EXPECTED_INPUT}; got columns {[str(c) for c in frame.columns]}")


def _records(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)


def _column(value):
    return [value] if np.ndim(value) == 0 or isinstance(value, (str, bytes)) else list(value)


def _unnamed(values: list) -> pd.DataFrame:
    """Paths (str or path-like) go to `path`, bytes to `image`; anything else is refused."""
    paths, images = [], []
    for index, value in enumerate(values):
        if isinstance(value, (str, os.PathLike)):
            paths.append(os.fspath(value))
            images.append(None)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            paths.append(None)
            images.append(bytes(value))
        else:
            raise InputError(f"row {index}: {EXPECTED_INPUT}; got {type(value).__name__}")
    return pd.DataFrame({"path": paths, "image": images}, dtype=object)


def _present(value) -> bool:
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return len(value) > 0
    return value is not None and not (np.ndim(value) == 0 and pd.isna(value))


def _image_bytes(raw, limits: ImageLimits) -> bytes:
    """Encoded bytes as sent: raw bytes, or base64 text (JSON), refused before decoding if large."""
    if isinstance(raw, str):
        if len(raw) > 4 * (limits.max_bytes // 3 + 1):
            limits.check_bytes(len(raw) * 3 // 4)
        try:  # line breaks (base64 without -w0) are not errors
            return base64.b64decode("".join(raw.split()), validate=True)
        except binascii.Error:
            raise ImageRejected("`image` is not valid base64") from None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    raise ImageRejected(f"`image` must be encoded bytes or base64 text, not {type(raw).__name__}")


# ---------------------------------------------------------------------------------------------
# Which files a call may read


@dataclass(frozen=True)
class FileAccess:
    """`anywhere`: any file this process can read (the caller's own process asked for it).
    `root`: only regular files inside this folder (an operator's DEEPCLUSTER_SERVE_ROOT).
    `serving`: in a model server, which never names paths in its answers."""

    anywhere: bool
    root: str | None
    serving: bool

    @classmethod
    def for_call(cls, params: dict | None) -> FileAccess:
        serving = os.environ.get(MLFLOW_SERVING_FLAG, "").lower() in ("true", "1")
        asked = bool((params or {}).get(ALLOW_PATHS, False))
        if asked and serving:
            raise InputError(
                f"`{ALLOW_PATHS}` is not accepted by a model server; send the image bytes in an "
                "`image` column (the server's operator may allow one folder)"
            )
        root = os.environ.get(SERVE_ROOT) or None
        return cls(anywhere=asked, root=os.path.realpath(root) if root else None, serving=serving)

    def label(self, index, path) -> str:
        return f"row {index}" if self.serving else f"row {index} ({path})"

    def read(self, path, limits: ImageLimits) -> bytes:
        if not isinstance(path, (str, os.PathLike)):
            raise ImageRejected(f"`path` must be text, not {type(path).__name__}")
        if self.anywhere:
            return read_regular_file(path, limits)
        if self.root is None:
            raise ImageRejected(self._no_files())
        return read_regular_file(self._inside_root(os.fspath(path)), limits, follow=False)

    def _inside_root(self, path: str) -> str:
        """The real path of `path` (relative paths start at the root); refused outside it."""
        try:
            real = os.path.realpath(os.path.join(self.root, path))
        except (ValueError, OSError):  # e.g. an embedded NUL byte
            raise ImageRejected("`path` is not a valid file name") from None
        if os.path.commonpath([self.root, real]) != self.root:
            raise ImageRejected("`path` is outside the folder this server may read")
        return real

    def _no_files(self) -> str:
        if self.serving:
            return "this server does not read files: send the image bytes in an `image` column"
        return (
            f"reading files needs params={{'{ALLOW_PATHS}': True}} (in your own process) or "
            f"{SERVE_ROOT}; or send the image bytes in an `image` column"
        )
