"""Each version's tensors stored once, by content, in the artifact store (docs/storage.md, "Tensors stored once").

A trained step's learner-state bundle (``components/model/state.py``) holds its tensors in safetensors files:
``backbone.safetensors`` (the whole state dict when the method changed the weights), ``method/tensors.safetensors``,
``pools/<task>.safetensors``. Before the step publishes, :func:`externalize` splits each such file into one blob
per tensor, ``<artifacts.root>/tensors/<d[:2]>/<d>.safetensors``, where ``d`` is the SHA-256 of the blob: a
safetensors file holding that one tensor, named ``t``, written the same way every time, so the same dtype, shape
and bytes always make the same blob. A blob already there is not written again: the tensors a step left as its
parent had them (frozen towers, untouched layers, the carried-over pools) are stored by the first version that
had them, and the base model's own tensors (``backbone.safetensors`` entries equal to the configured base
model's) are not stored at all: the base model file is where they are. The file is replaced by
``<file>.tensors.json``, its manifest::

    {"format": "cliploop-tensors/1", "file": "backbone.safetensors", "sha256": <the file's>, "size": ...,
     "store": <where the blobs were written>, "header": <the file's safetensors header, verbatim>,
     "tensors": {name: {"digest", "dtype", "shape", "bytes", "base": true only for the base model's own}}}

The bundle's own ``manifest.json`` is left as it was and still names the file with its SHA-256, so a loader that
does not know about blobs fails on the missing file instead of loading a model without its weights.
:func:`materialize` writes the files back, byte for byte: every blob is checked against its digest before its
bytes are used (a changed or planted blob stops the load with a one-line error naming it), and the rebuilt file
against the SHA-256 its manifest records. Blobs are only read as bytes (never unpickled, never imported).

The manifests travel with the bundle into the MLflow model, where the version's pin covers them
(``components/registry/model_pins.py``): the registry remains what says which bytes a version loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from components.registry.blob_store import BlobStore, TensorStoreError, candidates, fetch_blob
from components.support import storage

FORMAT = "cliploop-tensors/1"
SUFFIX = ".tensors.json"
BASE_FILE = "backbone.safetensors"  # the one file of a bundle whose tensors may be the base model's own
BLOB_NAME = "t"
_MAX_HEADER = 100 << 20


# ---- the blob format --------------------------------------------------------------------------------------


def encode_blob(dtype: str, shape: list[int], data: bytes) -> bytes:
    """One tensor as a safetensors file: the same bytes for the same dtype, shape and data, always."""
    head = {BLOB_NAME: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, len(data)]}}
    header = json.dumps(head, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format's padding, so the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header + data


_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def tensor_blob(tensor) -> bytes:
    """A torch tensor as its blob: the bytes a safetensors file of it holds (little-endian, row-major)."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    dtype = _DTYPES.get(str(t.dtype).removeprefix("torch."))
    if dtype is None:
        raise TensorStoreError(f"tensors of dtype {t.dtype} are not stored as blobs")
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return encode_blob(dtype, list(t.shape), raw)


def read_header(data: bytes, where: str) -> tuple[bytes, dict[str, Any], int]:
    """A safetensors buffer's header bytes, parsed header and the offset where its data starts."""
    if len(data) < 8:
        raise TensorStoreError(f"{where}: not a safetensors file (shorter than its header length)")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise TensorStoreError(f"{where}: not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        raise TensorStoreError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise TensorStoreError(f"{where}: not a safetensors file (its header is not a table)")
    return data[8 : 8 + n], header, 8 + n


def layout(header: dict[str, Any], size: int, where: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of every tensor in data order; the data must be the tensors back to back (a gap
    only of zero bytes, checked where the bytes are known), ending at ``size``."""
    spans = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        spans.append((name, int(start), int(end)))
    spans.sort(key=lambda s: (s[1], s[2]))
    at = 0
    for name, start, end in spans:
        if start < at or end < start:
            raise TensorStoreError(f"{where}: tensor {name} overlaps another")
        at = end
    if at != size:
        raise TensorStoreError(f"{where}: its data is {size} bytes, its tensors end at {at}")
    return spans


def blob_data(blob: bytes, entry: dict[str, Any], where: str) -> bytes:
    """The tensor bytes of a verified blob, after checking it holds the tensor its manifest entry describes."""
    _, header, start = read_header(blob, where)
    spec = header.get(BLOB_NAME, {})
    if spec.get("dtype") != entry["dtype"] or list(spec.get("shape", [])) != list(entry["shape"]):
        raise TensorStoreError(
            f"{where}: holds {spec.get('dtype')} {spec.get('shape')}, not {entry['dtype']} {entry['shape']}"
        )
    return blob[start:]


# ---- a bundle's files to blobs and back -------------------------------------------------------------------


def manifests(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The tensor manifests of a bundle folder by the relative path of the file each stands for."""
    out = {}
    for path in sorted(Path(state_dir).rglob(f"*{SUFFIX}")):
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise TensorStoreError(f"{path}: tensor manifest of format {doc.get('format')!r}, not {FORMAT}")
        out[path.relative_to(state_dir).as_posix().removesuffix(SUFFIX)] = doc
    return out


def referenced(docs: Iterable[dict[str, Any]]) -> set[str]:
    """The blob digests the manifests need (not the base model's own tensors)."""
    return {t["digest"] for doc in docs for t in doc["tensors"].values() if not t.get("base")}


def externalize(state_dir: Path, store: BlobStore, base_digests: Callable[[], dict[str, str]] | None = None) -> dict:
    """Replace every safetensors file of the bundle by its tensor manifest, storing the blobs the store lacks.
    ``base_digests``: the base model's tensor digests by name (asked for only when the bundle has a backbone).
    Returns {"added": {digest: blob bytes}, "files": [relative paths]}."""
    state_dir = Path(state_dir)
    added: dict[str, int] = {}
    files = []
    for path in sorted(state_dir.rglob("*.safetensors")):
        rel = path.relative_to(state_dir).as_posix()
        data = path.read_bytes()
        header_bytes, header, start = read_header(data, rel)
        base = base_digests() if (rel == BASE_FILE and base_digests is not None) else {}
        tensors: dict[str, dict[str, Any]] = {}
        at = 0
        for name, lo, hi in layout(header, len(data) - start, rel):
            if any(data[start + at : start + lo]):
                raise TensorStoreError(f"{rel}: bytes between its tensors before {name}")
            at, raw = hi, data[start + lo : start + hi]
            spec = header[name]
            blob = encode_blob(spec["dtype"], spec["shape"], raw)
            digest = storage.sha256_bytes(blob)
            entry = {"digest": digest, "dtype": spec["dtype"], "shape": list(spec["shape"]), "bytes": len(raw)}
            if base.get(name) == digest:
                entry["base"] = True
            elif store.put(digest, blob):
                added[digest] = len(blob)
            tensors[name] = entry
        doc = {
            "format": FORMAT,
            "file": rel,
            "sha256": storage.sha256_bytes(data),
            "size": len(data),
            "store": store.root,
            "header": header_bytes.decode("utf-8"),
            "tensors": tensors,
        }
        storage.atomic_write_text(path.with_name(path.name + SUFFIX), json.dumps(doc, indent=1, sort_keys=True))
        path.unlink()  # the manifest is written first: a crash between leaves both, never neither
        files.append(rel)
    return {"added": added, "files": files}


def rebuild(
    doc: dict[str, Any], stores: list[BlobStore], base: Callable[[], dict[str, Any]] | None, where: str
) -> bytes:
    """The file a manifest stands for, from verified blobs (and the base model's tensors), byte for byte."""
    header_bytes = doc["header"].encode("utf-8")
    header = json.loads(header_bytes)
    size = doc["size"] - 8 - len(header_bytes)
    parts, at = [len(header_bytes).to_bytes(8, "little"), header_bytes], 0
    pool = candidates(*stores, recorded=doc.get("store"))
    for name, lo, hi in layout(header, size, where):
        entry = doc["tensors"].get(name)
        if entry is None:
            raise TensorStoreError(f"{where}: its manifest lists no blob for tensor {name}")
        if entry.get("base"):
            raw = base_data(name, entry, base, where)
        else:
            raw = blob_data(fetch_blob(entry["digest"], pool), entry, f"tensor blob {entry['digest']}")
        if len(raw) != hi - lo:
            raise TensorStoreError(f"{where}: tensor {name} is {len(raw)} bytes, its header says {hi - lo}")
        parts += [bytes(lo - at), raw]
        at = hi
    data = b"".join(parts)
    if storage.sha256_bytes(data) != doc["sha256"]:
        raise TensorStoreError(f"{where}: rebuilt from its blobs it does not have the sha256 its manifest records")
    return data


def base_data(name: str, entry: dict[str, Any], base: Callable[[], dict[str, Any]] | None, where: str) -> bytes:
    """The bytes of a tensor the manifest takes from the base model, checked against the digest it records."""
    tensors = base() if base is not None else {}
    if name not in tensors:
        raise TensorStoreError(f"{where}: tensor {name} is the base model's, and no base model was given")
    blob = tensor_blob(tensors[name])
    if storage.sha256_bytes(blob) != entry["digest"]:
        raise TensorStoreError(f"{where}: the base model's tensor {name} is not the one this version was made from")
    return blob_data(blob, entry, f"base tensor {name}")


def materialize(
    state_dir: Path, stores: list[BlobStore], base: Callable[[], dict[str, Any]] | None = None
) -> list[str]:
    """Write back, in ``state_dir``, every file that a tensor manifest stands for (left as it is when it is
    already there and intact); returns the files written. The manifests stay beside them."""
    written = []
    for rel, doc in manifests(state_dir).items():
        target = Path(state_dir) / rel
        if target.is_file() and storage.sha256_file(target) == doc["sha256"]:
            continue
        storage.atomic_write_bytes(target, rebuild(doc, stores, base, rel))
        written.append(rel)
    return written


def blob_problems(state_dir: Path, stores: list[BlobStore]) -> list[str]:
    """For ``lineage --verify``: one line per blob of the bundle that is missing or not what its digest says."""
    problems, seen = [], set()
    for rel, doc in manifests(state_dir).items():
        pool = candidates(*stores, recorded=doc.get("store"))
        for name, entry in sorted(doc["tensors"].items()):
            if entry.get("base") or entry["digest"] in seen:
                continue
            seen.add(entry["digest"])
            try:
                fetch_blob(entry["digest"], pool)
            except TensorStoreError as exc:
                problems.append(f"{rel} ({name}): {exc}")
    return problems


def verify_bundle(state_dir: Path, stores: list[BlobStore]) -> None:
    """Every file the bundle's own manifest lists is there with its SHA-256, or stands as a tensor manifest that
    records that SHA-256 and whose blobs are all there and intact (the check of a kept step, without rebuilding)."""
    state_dir = Path(state_dir)
    if not (state_dir / "manifest.json").is_file():
        raise TensorStoreError(f"{state_dir} is not a learner-state bundle (no manifest.json)")
    listed = json.loads((state_dir / "manifest.json").read_text()).get("files", {})
    docs = manifests(state_dir)
    for rel, expected in sorted(listed.items()):
        path = state_dir / rel
        if path.is_file():
            if storage.sha256_file(path) != expected:
                raise TensorStoreError(f"{state_dir}: {rel} does not have the sha256 its manifest lists")
        elif rel in docs:
            if docs[rel]["sha256"] != expected:
                raise TensorStoreError(f"{state_dir}: {rel}{SUFFIX} stands for another file than the manifest lists")
        else:
            raise TensorStoreError(f"{state_dir}: {rel} is listed in the manifest but missing")
    problems = blob_problems(state_dir, stores)
    if problems:
        raise TensorStoreError(f"{state_dir}: {problems[0]}")
