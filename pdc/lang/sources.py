"""Resolve a model source to its Hugging Face config without loading any weights.

The checker needs the source architecture to validate targets and the dry run needs it to count
parameters, both offline and in milliseconds, so this reads only metadata:

- `dir("path")`      the directory's `config.json`
- `gguf("file")`     the GGUF header (sizes, vocab from the tokenizer, tied = no `output.weight`)
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
from typing import Any

from pdc.errors import PdcError
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


def _gguf_value(field) -> Any:
    """A scalar or string GGUF metadata value, for gguf-py versions with or without contents()."""
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def gguf_key_mapping() -> dict:
    """transformers' map from GGUF metadata keys to config keys, per architecture it can load
    from GGUF (a plain dict in a module that does not import torch)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return GGUF_CONFIG_MAPPING


def gguf_config(path: Path) -> dict:
    """An HF-style config dict from a GGUF file's header (no tensor data is read)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")
    except Exception as exc:
        raise SourceError(f"cannot read GGUF file {path}: {exc}".splitlines()[0]) from None
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        return _gguf_value(fields[key]) if key in fields else default

    arch = get("general.architecture")
    mapping = gguf_key_mapping()
    model_type = next((m for m in (arch, str(arch).replace("-", "_"), str(arch).replace("moe", "_moe"))
                       if m in mapping and m not in ("general", "tokenizer")), None)
    if model_type is None:
        known = sorted(k for k in mapping if k not in ("general", "tokenizer"))
        raise SourceError(f"GGUF file {path} has architecture {arch!r}, which transformers cannot load from GGUF "
                          f"(it reads {', '.join(known)})")
    cfg: dict[str, Any] = {"model_type": model_type}
    for key, target in mapping[model_type].items():  # transformers' own GGUF -> config key map
        value = get(f"{arch}.{key}")
        if target is not None and value is not None and not isinstance(value, (list, dict)):
            cfg[target] = value
    for key, name in (("embedding_length", "hidden_size"), ("block_count", "num_hidden_layers"),
                      ("attention.head_count", "num_attention_heads"), ("feed_forward_length", "intermediate_size")):
        if not isinstance(cfg.get(name), (int, float)):
            raise SourceError(f"GGUF file {path} lacks metadata '{arch}.{key}'")
    if "tokenizer.ggml.tokens" in fields:
        cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    elif cfg.get("vocab_size") is None:
        raise SourceError(f"GGUF file {path} has neither a tokenizer nor '{arch}.vocab_size'")
    cfg["tie_word_embeddings"] = "output.weight" not in {t.name for t in reader.tensors}
    return cfg


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
