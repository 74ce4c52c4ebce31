"""What the gateway reads from users' files: only from IMPORT_DIR, or uploaded, and checked before the store sees it.

A path (`adapter_path`, a training `path`) names something inside the import folder, relative to it or
absolute under it. Each file is resolved, must lie inside the resolved folder, and is then opened one path
component at a time from that folder with `O_NOFOLLOW`, so neither a symlink nor one swapped in meanwhile
can lead a read outside it. Every way a path can be unusable (missing, outside, a symlink leading out, not a
folder, no safetensors weights) is the same error with the same message, so an answer never tells whether
something exists elsewhere on the server. Adapters are safetensors only: a pickled `adapter_model.bin` runs
code when loaded. An adapter is copied into a staging folder of the store only after its files passed.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from starlette.datastructures import UploadFile

from core.adapter_store import AdapterStore, adapter_rank, write_manifest
from core.errors import InvalidAdapter, InvalidInput
from core.jsonl import parse_jsonl

INVALID_IMPORT_PATH = "invalid_import_path"
INVALID_UPLOAD = "invalid_upload"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
UPLOAD_FIELDS = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)
MAX_JSON_BYTES = 1_000_000  # adapter_config.json and manifest.json are a few hundred bytes
MAX_SAFETENSORS_HEADER = 100_000_000  # the library's own bound on the JSON header
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a FIFO does not hang open


class InvalidImportPath(InvalidInput):
    """A path that cannot be imported, whatever the reason: one message, so nothing about the server leaks."""

    def __init__(self, param: str, what: str) -> None:
        super().__init__(f"'{param}' must name {what} inside the gateway's import folder (PROMPTINTERN_IMPORT_DIR), "
                         "relative to it or absolute", param=param, code=INVALID_IMPORT_PATH)


def adapter_path_refused() -> InvalidImportPath:
    return InvalidImportPath("adapter_path", f"a PEFT LoRA folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")


def train_path_refused() -> InvalidImportPath:
    return InvalidImportPath("train.path", "a JSONL file of training rows")


def _parts_inside(root: str, given: str) -> list[str] | None:
    """The components of `given`, resolved, below `root` (itself resolved); None when it resolves outside."""
    try:
        real = os.path.realpath(os.path.join(root, given))
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        return None
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return [part for part in os.path.relpath(real, root).split(os.sep) if part not in ("", ".")]


def open_inside(root: Path, given: str) -> BinaryIO | None:
    """A regular file at `given` opened for reading if it resolves inside `root` with no symlink on the way now."""
    base = os.path.realpath(root)
    parts = _parts_inside(base, given)
    if not parts:
        return None
    try:
        folder = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                child = os.open(part, _DIR_FLAGS, dir_fd=folder)
                os.close(folder)
                folder = child
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder)
        finally:
            os.close(folder)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bounded(file: BinaryIO, limit: int, what: str, *, param: str, code: str) -> bytes:
    data = file.read(limit + 1)
    if len(data) > limit:
        raise InvalidInput(f"{what} is larger than {limit} bytes", param=param, code=code)
    return data


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_adapter_config(raw: bytes, max_rank: int, param: str) -> dict[str, Any]:
    """A PEFT LoRA config with integer ranks within the limit (strings or lists where numbers belong are 422s)."""
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}", param=param, code="invalid_adapter") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidAdapter("only LoRA adapters are supported (peft_type must be LORA)", param=param,
                             code="invalid_adapter")
    if not _is_rank(config.get("r")):
        raise InvalidAdapter(f"{CONFIG_FILE}: 'r' must be a positive integer", param=param, code="invalid_adapter")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_rank(v) for v in pattern.values()):
        raise InvalidAdapter(f"{CONFIG_FILE}: 'rank_pattern' must map module names to positive integers",
                             param=param, code="invalid_adapter")
    rank = adapter_rank(config)
    if rank > max_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds the gateway's MAX_LORA_RANK {max_rank}", param=param,
                             code="adapter_rank_too_large")
    return config


def check_safetensors(weights: BinaryIO, param: str) -> None:
    """The file starts as safetensors does (a length, then a JSON header), so a renamed pickle goes no further."""
    weights.seek(0, os.SEEK_END)
    size = weights.tell()
    weights.seek(0)
    head = weights.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    try:
        if not 2 <= length <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ValueError("bad header length")
        header = json.loads(weights.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a safetensors file", param=param,
                             code="invalid_adapter") from exc
    finally:
        weights.seek(0)


def _parse_manifest(raw: bytes, param: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict):
        raise InvalidAdapter(f"{MANIFEST_FILE} is not a JSON object", param=param, code="invalid_adapter")
    return manifest


@dataclass
class AdapterFiles:
    """An adapter's files, checked and open, not yet in the store: what a path import and an upload both yield."""

    config: dict[str, Any]
    weights: BinaryIO
    manifest: dict[str, Any] | None
    origin: str  # recorded in the version's manifest: the path as given, or "upload"

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> AdapterFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_import_adapter(import_dir: Path, given: str, *, max_rank: int, max_bytes: int) -> AdapterFiles:
    """Open and check the adapter folder `given` inside `import_dir` (relative to it or absolute under it)."""
    param = "adapter_path"
    config_file = open_inside(import_dir, os.path.join(given, CONFIG_FILE))
    if config_file is None:
        raise adapter_path_refused()
    with config_file:
        raw_config = read_bounded(config_file, MAX_JSON_BYTES, CONFIG_FILE, param=param, code="invalid_adapter")
    weights = open_inside(import_dir, os.path.join(given, WEIGHTS_FILE))
    if weights is None:
        raise adapter_path_refused()
    try:
        manifest_path = os.path.join(given, MANIFEST_FILE)
        manifest_file = open_inside(import_dir, manifest_path)
        if manifest_file is None and os.path.lexists(os.path.join(os.path.realpath(import_dir), manifest_path)):
            raise adapter_path_refused()  # there, but not a regular file inside the folder
        manifest = None
        if manifest_file is not None:
            with manifest_file:
                manifest = _parse_manifest(read_bounded(manifest_file, MAX_JSON_BYTES, MANIFEST_FILE, param=param,
                                                        code="invalid_adapter"), param)
        if os.fstat(weights.fileno()).st_size > max_bytes:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is larger than {max_bytes} bytes (MAX_UPLOAD_BYTES)", param=param,
                                 code="invalid_adapter")
        config = check_adapter_config(raw_config, max_rank, param)
        check_safetensors(weights, param)
    except BaseException:
        weights.close()
        raise
    return AdapterFiles(config=config, weights=weights, manifest=manifest, origin=given)


def upload_parts(items: Iterable[tuple[str, UploadFile | str]]) -> dict[str, BinaryIO]:
    """The files of a multipart upload by field name: the adapter's two files, optionally its manifest."""
    expected = f"send {CONFIG_FILE} and {WEIGHTS_FILE} (safetensors only), optionally {MANIFEST_FILE}, as file parts"
    parts: dict[str, BinaryIO] = {}
    for key, value in items:
        if key not in UPLOAD_FIELDS:
            raise InvalidInput(f"unexpected form field '{key}': {expected}", param=key, code=INVALID_UPLOAD)
        if key in parts:
            raise InvalidInput(f"form field '{key}' is sent more than once", param=key, code=INVALID_UPLOAD)
        if isinstance(value, str):
            raise InvalidInput(f"form field '{key}' must be a file part (with a filename)", param=key,
                               code=INVALID_UPLOAD)
        parts[key] = value.file
    missing = [key for key in (CONFIG_FILE, WEIGHTS_FILE) if key not in parts]
    if missing:
        raise InvalidInput(f"the upload lacks {' and '.join(missing)}: {expected}", param=missing[0],
                           code=INVALID_UPLOAD)
    return parts


def adapter_from_upload(parts: Mapping[str, BinaryIO], *, max_rank: int) -> AdapterFiles:
    """Check uploaded files exactly as a path import's (the caller keeps them open until they are staged)."""
    config = check_adapter_config(read_bounded(parts[CONFIG_FILE], MAX_JSON_BYTES, CONFIG_FILE, param=CONFIG_FILE,
                                               code=INVALID_UPLOAD), max_rank, CONFIG_FILE)
    manifest = None
    if MANIFEST_FILE in parts:
        manifest = _parse_manifest(read_bounded(parts[MANIFEST_FILE], MAX_JSON_BYTES, MANIFEST_FILE,
                                                param=MANIFEST_FILE, code=INVALID_UPLOAD), MANIFEST_FILE)
    check_safetensors(parts[WEIGHTS_FILE], WEIGHTS_FILE)
    return AdapterFiles(config=config, weights=parts[WEIGHTS_FILE], manifest=manifest, origin="upload")


def stage_adapter(store: AdapterStore, files: AdapterFiles, prompt: str, version: int, served_model_name: str,
                  manifest: dict[str, Any]) -> Path:
    """Write checked files into a staging folder and publish it as `<prompt>/v<N>`, naming the served base model
    (vLLM refuses an adapter whose base model it does not serve)."""
    staging = store.staging_dir(prompt, version)
    try:
        config = {**files.config, "base_model_name_or_path": served_model_name}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        files.weights.seek(0)
        with (staging / WEIGHTS_FILE).open("wb") as out:
            shutil.copyfileobj(files.weights, out)
        write_manifest(staging, manifest)
        return store.publish(staging, prompt, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_import_jsonl(import_dir: Path, given: str, *, max_bytes: int) -> list[Any]:
    """The rows of a JSONL training file inside `import_dir` (blank lines skipped); errors name the line."""
    param, code = "train.path", "invalid_train_data"
    file = open_inside(import_dir, given)
    if file is None:
        raise train_path_refused()
    with file:
        data = read_bounded(file, max_bytes, "the training file", param=param, code=code)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the training file is not UTF-8 text: {exc}", param=param, code=code) from None
    try:
        rows = parse_jsonl(text)
    except ValueError as exc:
        raise InvalidInput(f"the training file, {exc}", param=param, code=code) from None
    if not rows:
        raise InvalidInput("the training file has no rows", param=param, code=code)
    return rows
