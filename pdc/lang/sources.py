"""Resolve a model source to its Hugging Face config without loading any weights.

The checker needs the source architecture to validate targets and the dry run needs it to count
parameters, both offline and in milliseconds, so this reads only metadata:

- `dir("path")`      the directory's `config.json`
- `gguf("file")`     the config the GGUF header describes (`pdc.lang.gguf_header.gguf_config`: the
                     one reading of a GGUF file, which the converted checkpoint's config is built from)
- `hf("org/name")`   a config bundled in `pdc/configs/` for well-known ids, else the local
                     Hugging Face cache (never the network)
- `builtin("name")`  the bundled copy of the `pdc setup` asset's config (same architecture)

Every failure is a `SourceError` with a one-line cause; the checker reports it at the source's
span in the spec.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path

from pdc.errors import PdcError
from pdc.lang import gguf_header
from pdc.lang.settings import ModelSource


class SourceError(PdcError):
    def __init__(self, message: str):
        super().__init__(message, "spec")


@functools.lru_cache(maxsize=None)
def _index() -> dict:
    return json.loads(importlib.resources.files("pdc").joinpath("configs", "index.json").read_text())


def bundled_config(filename: str) -> dict:
    return json.loads(importlib.resources.files("pdc").joinpath("configs", filename).read_text())


def bundled_hub_ids() -> list[str]:
    return sorted(_index()["hub"])


def local_path(ref: str, base_dir: Path | None) -> Path:
    """`ref` relative to the spec's directory (absolute and `~` paths kept)."""
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object")
    return data


def _from_dir(ref: str, base_dir: Path | None) -> dict:
    path = local_path(ref, base_dir)
    if not path.exists():
        raise SourceError(f"model directory not found: {path}")
    if not path.is_dir():
        raise SourceError(f"dir() needs a Hugging Face model directory, got a file: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SourceError(f"no config.json in model directory {path}")
    return _read_json(cfg)


def _hub_cache_config(repo_id: str) -> dict | None:
    """`config.json` of `repo_id` from the local Hugging Face cache, if it was ever downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # malformed ids raise validation errors; treat them as unknown
        return None
    if isinstance(hit, str) and Path(hit).is_file():
        return _read_json(Path(hit))
    return None


def _from_hub(ref: str) -> dict:
    by_lower = {k.lower(): v for k, v in _index()["hub"].items()}
    if ref.lower() in by_lower:
        return bundled_config(by_lower[ref.lower()])
    cached = _hub_cache_config(ref)
    if cached is not None:
        return cached
    raise SourceError(
        f"unknown hub model '{ref}': no bundled config and not in the local Hugging Face cache "
        f"(pdc works offline; use dir(\"path\") for a local checkout; bundled: "
        f"{', '.join(bundled_hub_ids())})"
    )


def _from_builtin(ref: str) -> dict:
    """The bundled config of a `pdc setup` model. Deliberately not read from the installed
    checkpoint: locating it imports `pdc.inputs.assets` -> `pdc.inputs.data` -> torch (seconds), and the
    architecture is identical (tests/test_spec_sources.py compares them when installed)."""
    table = _index()["builtin"]
    if ref not in table:
        raise SourceError(f"unknown builtin model '{ref}' (available: {', '.join(sorted(table))})")
    return bundled_config(table[ref])


def gguf_config(path: Path) -> dict:
    """The config of a GGUF file (`pdc.lang.gguf_header.gguf_config`: pdc's one reading of a
    GGUF header, which the converted checkpoint's config is built from too)."""
    try:
        return gguf_header.gguf_config(path)
    except gguf_header.GgufError as exc:
        raise SourceError(exc.message) from None


def _from_gguf(ref: str, base_dir: Path | None) -> dict:
    path = local_path(ref, base_dir)
    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}")
    return gguf_config(path)


def resolve_config(source: ModelSource, base_dir: Path | None = None) -> dict:
    """The Hugging Face config dict of `source` (a fresh copy; callers may modify it)."""
    if source.kind == "dir":
        return _from_dir(source.ref, base_dir)
    if source.kind == "gguf":
        return _from_gguf(source.ref, base_dir)
    if source.kind == "hf":
        return dict(_from_hub(source.ref))
    if source.kind == "builtin":
        return dict(_from_builtin(source.ref))
    raise SourceError(f"unknown model source kind '{source.kind}'")
