"""What every checkpoint reader shares: tensors read without running code, one state-dict check, one hash.

No file vnp reads may run code. A `.pt`/`.bin` file is a pickle, so it is read with
`torch.load(weights_only=True)`, which rebuilds only tensors, containers and the globals a caller
allows by name; a file that asks for anything else is refused before any of it runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from vnp_core.errors import first_line


class CheckpointError(ValueError):
    """A model file that cannot be read as the checkpoint it should be (the message names the file)."""


def load_pickled_tensors(path: Path, *, allowed: Sequence[type] = (), mmap: bool = False, device: str = "cpu"):
    """`torch.load` of a pickled checkpoint, refusing any global outside the tensors and `allowed`."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch reports any unpickling failure under weights_only as such; only a torch archive or a
        # pickle (PROTO opcode first) can be one that asks for code, anything else is no checkpoint.
        if not (zipfile.is_zipfile(path) or _starts_with(path, b"\x80")):
            raise CheckpointError(f"{path}: not a readable torch checkpoint "
                                  "(neither a torch zip archive nor a pickle)") from error
        raise CheckpointError(f"{path}: refused: loading it would run code or build objects a checkpoint "
                              f"does not hold ({_unpickler_reason(error)})") from error
    except Exception as error:  # noqa: BLE001 - a garbled pickle makes the unpickler raise anything (IndexError, KeyError...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(error)})") from error


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (e.g. "Unsupported global: GLOBAL os.system ..."),
    without its advice to load the file with weights_only=False."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return found.group(1).split(". ")[0] if found else first_line(error)


def _starts_with(path: Path, prefix: bytes) -> bool:
    with Path(path).open("rb") as f:
        return f.read(len(prefix)) == prefix


def read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A flat state dict from a `.safetensors` file or a pickled `.pt`/`.bin` one."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error}): "
                                  "download or copy it again") from error
    state = load_pickled_tensors(path, device=device)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return state


def read_json(path: Path, required: Sequence[str] = ()) -> dict:
    """A JSON object file (a model's config.json, a sharded index) with its `required` keys."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing: a model directory needs it") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if missing := [key for key in required if key not in data]:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    return data


def check_state_dict(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: Path,
                     what: str) -> None:
    """Every expected weight present with its shape, nothing else: a wrong file fails here, not as a wrong vector."""
    for key, tensor in expected.items():
        if key not in found:
            raise CheckpointError(f"{source}: missing weight {key!r} for {what}")
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(found[key].shape)}, "
                                  f"expected {tuple(tensor.shape)} for {what}")
    if unexpected := sorted(set(found) - set(expected)):
        raise CheckpointError(f"{source}: unexpected weight(s) for {what}: {', '.join(unexpected[:5])}")


def sha256_files(paths: Iterable[Path]) -> str:
    """One checksum over the files' bytes in order: a model's identity in every output.

    Remembered per process for files of unchanged inode, size and modification time: a device process
    describes a model (the embedding store's lookup) before it loads it, and loads it again per shard.
    """
    return _sha256_files(tuple((str(path), (stat := Path(path).stat()).st_ino, stat.st_size, stat.st_mtime_ns)
                               for path in paths))


@functools.lru_cache(maxsize=16)
def _sha256_files(files: tuple[tuple[str, int, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, *_ in files:
        with Path(path).open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
