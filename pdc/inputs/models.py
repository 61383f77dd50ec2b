"""Model sources as local Hugging Face checkpoint directories, and the one way pdc loads them.

`materialize_model` resolves a spec's `ModelSource`: `dir(...)` is used in place, `builtin(...)`
is a `pdc setup` asset, `gguf(...)` is dequantized once into the cache, `hf(...)` must already be
in the local Hugging Face cache (pdc never downloads at run time). `source_identity` says what a
source is for the build's stage keys; `load_causal_lm` is the one loader (fp32 by default, eval
mode) that evaluation, depth saliency and training use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM

from pdc.arch import Arch
from pdc.errors import PdcError, one_line
from pdc.files import sha256_file, staged_dir, write_json
from pdc.inputs import assets
from pdc.inputs.cache import cache_root
from pdc.inputs.gguf import convert_gguf
from pdc.inputs.verify import content_differences, content_hashes
from pdc.lang.settings import DataSource, ModelSource

LOCAL_DATA_KINDS = ("json", "jsonl", "text", "parquet")


def local_path(ref: str, base_dir: Path) -> Path:
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base_dir / path


def materialize_model(src: ModelSource, base_dir: Path, checked_config: dict | None = None) -> Path:
    """A local Hugging Face checkpoint directory for `src`; with `checked_config` (the config the
    spec was checked against), one whose architecture is that config's (`check_source_config`)."""
    path = _materialize(src, base_dir)
    if checked_config is not None:
        check_source_config(path, checked_config, src)
    return path


def check_source_config(model_dir: Path, checked_config: dict, src: ModelSource) -> None:
    """The checkpoint the stages load has the architecture (model type, sizes, tied head) of the
    config the checker and the dry run read for `src`, else a one-line `PdcError` naming what
    differs: a spec is never built from a model other than the one it was checked against."""
    try:
        actual = Arch.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PdcError(f"cannot read the config of {model_dir}: {one_line(exc)}", "load") from exc
    expected = Arch.from_hf_config(checked_config)
    differ = [f"{f.name} {getattr(expected, f.name)!r} vs {getattr(actual, f.name)!r}"
              for f in dataclasses.fields(Arch) if getattr(expected, f.name) != getattr(actual, f.name)]
    if differ:
        raise PdcError(f"{src.kind}(\"{src.ref}\") was checked with a config the model it loads does not have "
                       f"({', '.join(differ)}: checked vs {model_dir})", "load")


def _materialize(src: ModelSource, base_dir: Path) -> Path:
    if src.kind == "dir":
        path = local_path(src.ref, base_dir)
        if not (path / "config.json").exists():
            raise PdcError(f"{path} is not a Hugging Face checkpoint directory (no config.json)", "load")
        return path
    if src.kind == "builtin":
        return assets.builtin_model_dir(src.ref)
    if src.kind == "gguf":
        path = local_path(src.ref, base_dir)
        if not path.exists():
            raise PdcError(f"GGUF file not found: {path}", "load")
        return converted_gguf(path)
    if src.kind == "hf":
        try:
            return Path(snapshot_download(src.ref, local_files_only=True))
        except Exception as exc:  # any hub-client failure means: not available offline
            raise PdcError(
                f"hub model {src.ref!r} is not in the local Hugging Face cache ({one_line(exc)}) and pdc "
                "never downloads at run time; download it first and use dir(\"...\")",
                "load",
            ) from exc
    raise PdcError(f"unknown model source kind {src.kind!r}", "load")


CONVERSION_RECORD = "pdc_conversion.json"


def converted_gguf(path: Path) -> Path:
    """A GGUF file dequantized once into a plain HF checkpoint in the cache.

    The conversion records the GGUF's sha256 and its own content hashes (`CONVERSION_RECORD`);
    a reuse checks both against the files, so a cache entry left by another GGUF at the same
    path, size and mtime, or damaged since, is converted again instead of trusted."""
    ident = hashlib.sha256(json.dumps([str(path.resolve()), file_identity(path)]).encode()).hexdigest()[:16]
    final = cache_root() / "models" / f"gguf-{path.stem}-{ident}"
    gguf_sha256 = gguf_digest(path)
    if (final / "config.json").exists():
        stale = _stale_conversion(final, gguf_sha256)
        if stale is None:
            return final
        print(f"[pdc] the cached conversion {final} {stale}: converting {path.name} again")
    else:
        print(f"[pdc] converting {path.name} to a Hugging Face checkpoint (once)")
    with staged_dir(final) as tmp:
        convert_gguf(path, tmp, verify=False)
        write_json(tmp / CONVERSION_RECORD, {"gguf": str(path), "gguf_sha256": gguf_sha256,
                                             "content": content_hashes(tmp, "load")})
    return final


def _stale_conversion(final: Path, gguf_sha256: str) -> str | None:
    """Why the conversion in `final` cannot be reused (None: it can)."""
    try:
        record = json.loads((final / CONVERSION_RECORD).read_text())
    except (OSError, ValueError):
        return "has no readable record of what it was converted from"
    if record.get("gguf_sha256") != gguf_sha256:
        return "was converted from a GGUF file with other contents"
    try:
        changed = content_differences(record.get("content") or {}, content_hashes(final, "load"))
    except PdcError as exc:
        return f"is unreadable ({exc.message})"
    if changed:
        return f"was modified or damaged since it was made ({', '.join(changed)} differ from the recorded sha256)"
    return None


def gguf_digest(path: Path) -> str:
    """sha256 of a GGUF file, hashed once per process while the file is unchanged."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, *identity) -> str:
    return sha256_file(path)


def file_identity(path: Path) -> list:
    """Cheap identity of a file or directory: names, sizes and mtimes (weights are not hashed)."""
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, int(st.st_mtime)]
    if path.is_dir():
        return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(path.iterdir()) if p.is_file()]
    return [str(path), "missing"]


def source_identity(src: ModelSource, base_dir: Path) -> list:
    """What a source is, for the stage keys: a directory by its files' names, sizes and mtimes; a
    GGUF file by its sha256 too (it is hashed anyway to check its cached conversion)."""
    if src.kind == "dir":
        path = local_path(src.ref, base_dir)
        return [src.kind, str(path), file_identity(path)]
    if src.kind == "gguf":
        path = local_path(src.ref, base_dir)
        return [src.kind, str(path), file_identity(path), gguf_digest(path) if path.is_file() else None]
    return [src.kind, src.ref]


def data_identity(src: DataSource, base_dir: Path) -> list:
    """What a corpus is, for the stage keys; generated and mixed data by what they read and how
    (nothing is generated to know it)."""
    plain = (src.kind, src.ref, src.split, src.field)
    if src.kind == "generate":
        g = src.generate
        return [plain, source_identity(g.model, base_dir), data_identity(g.prompts, base_dir),
                [g.tokens, g.length, g.prompt_tokens, g.temperature, g.seed, g.batch]]
    if src.kind == "mix":
        return [plain, [[name, data_identity(part, base_dir), share] for name, part, share in src.parts]]
    if src.kind in LOCAL_DATA_KINDS:
        return [plain, file_identity(local_path(src.ref, base_dir))]
    return [plain]


def load_causal_lm(model_dir: Path, stage: str, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None, zero3: dict | None = None):
    """The checkpoint in `model_dir` as an eval-mode `AutoModelForCausalLM`; a one-line
    `PdcError` naming the directory when it cannot be loaded. With `zero3` (a ZeRO-3 DeepSpeed
    config) the model is built inside `deepspeed.zero.Init`: each rank holds only its partition
    of every weight, and the checkpoint is read into the partitions (transformers' ZeRO-3 path)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise PdcError(f"no Hugging Face checkpoint in {model_dir} (config.json missing)", stage)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # transformers reads the ZeRO-3 config from this object while it lives (a weak reference)
    ds_config = _zero3_config(zero3) if zero3 is not None else None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as exc:  # transformers/safetensors raise many types for a bad checkpoint
        raise PdcError(f"cannot load the checkpoint in {model_dir}: {one_line(exc)}", stage) from exc
    finally:
        del ds_config
    return model.eval()


def _zero3_config(config: dict):
    from transformers.integrations import HfDeepSpeedConfig

    if config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("zero3 needs a DeepSpeed config with zero_optimization.stage 3")
    return HfDeepSpeedConfig(config)
