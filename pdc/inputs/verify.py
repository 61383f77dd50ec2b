"""Checkpoints are checked before any stage trusts them: a bad file is one line, never a bad model.

`verify_checkpoint(dir, stage)` runs, in order of cost, and raises a `PdcError` naming the file
and what is wrong at the first fault:

1. `config.json` exists and is a JSON object;
2. the weight files: `model.safetensors.index.json` (when present) names shards that exist and
   maps every tensor to a shard that holds it; each safetensors header is read and checked the
   way the safetensors library checks it (header length within the file, a JSON object, known
   dtypes, offsets that match shape x dtype and cover the data area exactly: a truncated or
   padded file is caught here, without reading tensor bytes);
3. shapes and dtypes agree with the config: the config is instantiated on the meta device (no
   memory, no per-family tables) and every tensor it expects must be stored with its shape, in a
   floating dtype for floating parameters, and in the config's `dtype` when it names one; a
   stored tensor the config has no place for is an error too (the config does not describe the
   weights);
4. a tokenizer is present (`tokenizer.json`, `tokenizer.model`, `vocab.json`, ...), loads, and
   produces no id beyond the embedding (`len(tokenizer) <= vocab_size`);
5. no NaN or Inf in any tensor: streamed tensor by tensor in bounded chunks. A clean result is
   remembered per file in `<cache>/verified/`, keyed by the file's path, inode, size, mtime and
   ctime (ctime changes on every write and cannot be set back by `touch` or `cp -p`), so a model
   read by several stages or several runs is scanned once. A content hash would be a safer key
   but costs as much as the scan it would save (both read every byte).

`read_exact` is the one length-checked read of tensor bytes (the graph's `WeightStore` uses it);
`content_hashes` is the one content identity of a checkpoint (config without volatile keys, and
each weight file), recorded in locks and beside cached conversions.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from pdc.errors import PdcError, json_reason, one_line
from pdc.files import sha256_file, sha256_json, write_json
from pdc.inputs.cache import cache_root

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
FLOAT_ST_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# Files any one of which makes a tokenizer AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "tiktoken.model")
# Config keys that change with the tool that saved the checkpoint, not with the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SCAN_CHUNK = 64 << 20  # bytes read at once while scanning for NaN/Inf
_TORCH_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: `nbytes` bytes at absolute `offset` of `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class CheckpointSummary:
    """What `verify_checkpoint` looked at."""

    model_dir: Path
    tensors: int
    bytes: int
    scanned: bool  # the NaN/Inf scan read the bytes now (False: remembered from an earlier scan)
    seconds: float
    tokenizer: object = None  # the loaded tokenizer, when it was checked


def _fail(message: str, stage: Optional[str]) -> PdcError:
    return PdcError(message, stage)


# ---- safetensors headers -------------------------------------------------------------------------
def read_safetensors_header(path: Path, stage: Optional[str] = None) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, with every check the format allows without reading
    tensor bytes. Raises a one-line `PdcError` naming the file and the fault."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(f"{path}: {size} bytes, too short to be a safetensors file (truncated? "
                            "copy or save it again)", stage)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise _fail(f"{path}: the header length field says {header_len:,} bytes but the file has "
                            f"{size - 8:,} after it: truncated or not a safetensors file (copy or save it again)",
                            stage)
            raw = fh.read(header_len)
    except OSError as exc:
        raise _fail(f"cannot read {path}: {one_line(exc)}", stage) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{path}: the header is not valid JSON ({one_line(exc)}): the file is damaged "
                    "(copy or save it again)", stage) from None
    if not isinstance(header, dict):
        raise _fail(f"{path}: the header is a JSON {type(header).__name__}, not an object: the file is damaged",
                    stage)
    data_len = size - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, 8 + header_len, stage)
    _check_coverage(path, entries, 8 + header_len, data_len, stage)
    return entries


def _entry(path: Path, name: str, info, base: int, stage: Optional[str]) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _fail(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets in the header: the file is "
                    "damaged", stage)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ST_DTYPES:
        raise _fail(f"{path}: tensor {name!r} has dtype {dtype!r}, which pdc cannot read "
                    f"(readable: {', '.join(ST_DTYPES)})", stage)
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _fail(f"{path}: tensor {name!r} has shape {shape!r} in the header: the file is damaged", stage)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _fail(f"{path}: tensor {name!r} has data_offsets {offsets!r}: the file is damaged", stage)
    need = ST_DTYPES[dtype][1]
    for d in shape:
        need *= d
    if offsets[1] - offsets[0] != need:
        raise _fail(f"{path}: tensor {name!r} ({dtype} {shape}) needs {need:,} bytes but its offsets span "
                    f"{offsets[1] - offsets[0]:,}: the file is damaged", stage)
    return TensorEntry(name, path, dtype, tuple(shape), base + offsets[0], offsets[1] - offsets[0])


def _check_coverage(path: Path, entries: dict[str, TensorEntry], data_start: int, data_len: int,
                    stage: Optional[str]) -> None:
    """The tensors tile the data area exactly (what safetensors calls "fully covered")."""
    end = 0
    for e in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        rel = e.offset - data_start
        if rel != end:
            raise _fail(f"{path}: tensor {e.name!r} starts at data byte {rel:,}, the previous one ends at "
                        f"{end:,}: the header is damaged", stage)
        end = rel + e.nbytes
    if end > data_len:
        raise _fail(f"{path}: truncated: the header describes {end:,} bytes of tensor data, the file holds "
                    f"{max(data_len, 0):,} (an interrupted download, copy or save: copy or save it again)", stage)
    if end < data_len:
        raise _fail(f"{path}: {data_len - end:,} bytes after the last tensor that no header entry covers: "
                    "the file is damaged (copy or save it again)", stage)


def weight_entries(model_dir: Path, stage: Optional[str] = None) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in `model_dir`, by name. With an index, exactly the tensors
    it maps, each checked to be in the shard it names; without one, `model.safetensors`."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.exists():
        weight_map = _read_index(index, stage)
        headers: dict[str, dict[str, TensorEntry]] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = model_dir / shard
            if not shard_path.is_file():
                raise _fail(f"{index}: names the shard {shard!r}, which is missing from {model_dir} "
                            "(an incomplete download or copy: copy the checkpoint again)", stage)
            headers[shard] = read_safetensors_header(shard_path, stage)
        entries = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise _fail(f"{index}: maps tensor {name!r} to {shard}, which does not hold it: the index and "
                            "the shards are from different saves (copy the checkpoint again)", stage)
            entries[name] = headers[shard][name]
        return entries
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return read_safetensors_header(single, stage)
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        raise _fail(f"{model_dir} has {', '.join(others)} but neither {SINGLE_NAME} nor {INDEX_NAME}: "
                    "the index of the shards is missing (copy the checkpoint again)", stage)
    legacy = sorted(p.name for p in model_dir.glob("pytorch_model*.bin"))
    if legacy:
        raise _fail(f"{model_dir} has only {legacy[0]}: pdc reads safetensors checkpoints; convert it with "
                    "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`", stage)
    raise _fail(f"no weights in {model_dir} ({SINGLE_NAME} or {INDEX_NAME} missing)", stage)


def _read_index(index: Path, stage: Optional[str]) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise _fail(f"{index}:{exc.lineno}:{exc.colno}: not valid JSON ({json_reason(exc)}): the index is damaged",
                    stage) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {index}: {one_line(exc)}", stage) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _fail(f"{index}: has no \"weight_map\" object of tensor -> shard file: the index is damaged", stage)
    return weight_map


def read_exact(path: Path, offset: int, nbytes: int, stage: Optional[str] = None,
               what: str = "tensor data") -> bytearray:
    """Exactly `nbytes` bytes of `path` from `offset`; a file shorter than that is an error,
    never zeros."""
    buf = bytearray(nbytes)
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            got = fh.readinto(buf) if nbytes else 0
    except OSError as exc:
        raise _fail(f"cannot read {path}: {one_line(exc)}", stage) from exc
    if got != nbytes:
        raise _fail(f"{path}: truncated: {what} needs bytes {offset:,}..{offset + nbytes:,} but the file "
                    f"ends at {offset + got:,} (copy or save it again)", stage)
    return buf


# ---- against the config ---------------------------------------------------------------------------
def read_config(model_dir: Path, stage: Optional[str] = None) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise _fail(f"model directory not found: {model_dir}", stage)
    if not path.exists():
        raise _fail(f"{model_dir} is not a Hugging Face checkpoint directory (no config.json)", stage)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _fail(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({json_reason(exc)})", stage) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {path}: {one_line(exc)}", stage) from exc
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise _fail(f"{path}: not a Hugging Face model config (no \"model_type\")", stage)
    return cfg


def expected_tensors(model_dir: Path, stage: Optional[str] = None):
    """The config instantiated on the meta device: (tensor groups, model). A group is the names
    of one tensor (tied weights share one), with its shape and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types for a config it cannot build
        raise _fail(f"{Path(model_dir) / 'config.json'}: transformers cannot build a model from it "
                    f"({one_line(exc)})", stage) from exc
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values()), model


def tied_head_names(model) -> set[str]:
    """The state-dict names of `model`'s output head when it is tied to the input embedding (one
    tensor under two names, which a checkpoint stores once: these names may be absent from it);
    empty when the head has its own weight. Read from the model's own embedding modules."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return set()
    return {f"{name}.weight" for name, module in model.named_modules(remove_duplicate=False) if module is head}


def module_names(model, keys: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """{stored key: (the module tensor transformers loads it into, merged)} by transformers' own
    load-time rules for `model`'s class: a renaming (GPT-NeoX's `embed_out.` -> `lm_head.`) or a
    conversion that merges several stored tensors into one (Mixtral-style checkpoints store each
    expert's w1/w3/w2; the module holds one `experts.gate_up_proj`), then `merged` is True. Keys
    no rule touches map to themselves."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # an older transformers without conversion rules: keys are module names
        return {k: (k, False) for k in keys}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    out = {}
    for key in keys:
        renamed, _ = rename_source_key(key, renamings, [])
        converted, _ = rename_source_key(key, renamings, converters)
        out[key] = (converted, converted != renamed)
    return out


def check_against_config(model_dir: Path, entries: dict[str, TensorEntry], cfg: dict,
                         stage: Optional[str] = None) -> None:
    """Every tensor the config expects is stored with its shape and a fitting dtype, and nothing
    else is stored."""
    import re

    groups, model = expected_tensors(model_dir, stage)
    want_dtype = _TORCH_DTYPE_NAMES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "").replace("torch.", ""))
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | \
        set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    ignore_unexpected = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    expected_names = set()
    cfg_path = Path(model_dir) / "config.json"
    stored_as = module_names(model, entries)
    merged = {}  # module tensor -> the stored tensors transformers merges into it (shapes change)
    renamed = {}  # module tensor -> the one stored tensor loaded into it under another name
    for key, (name, is_merged) in stored_as.items():
        if is_merged:
            merged.setdefault(name, []).append(entries[key])
        elif name != key and name not in entries:
            renamed[name] = entries[key]
    for names, tensor in groups:
        expected_names.update(names)
        parts = next((merged[n] for n in names if n in merged), None)
        if parts is not None:
            for part in parts:
                if tensor.is_floating_point() and part.dtype not in FLOAT_ST_DTYPES:
                    raise _fail(f"{part.file}: tensor {part.name!r} is stored as {part.dtype}, a floating "
                                f"weight is expected", stage)
            continue
        stored = next((entries[n] if n in entries else renamed[n] for n in names if n in entries or n in renamed), None)
        if stored is None:
            if any(p.search(n) for p in ignore_missing for n in names):
                continue
            raise _fail(f"{model_dir}: tensor {names[0]!r} {list(tensor.shape)}, which {cfg_path.name} "
                        "calls for, is in no weight file: the weights and the config do not belong together",
                        stage)
        if stored.shape != tuple(tensor.shape):
            raise _fail(f"{stored.file}: tensor {stored.name!r} has shape {list(stored.shape)}, {cfg_path.name} "
                        f"calls for {list(tensor.shape)}: the weights and the config do not belong together",
                        stage)
        if tensor.is_floating_point():
            if stored.dtype not in FLOAT_ST_DTYPES:
                raise _fail(f"{stored.file}: tensor {stored.name!r} is stored as {stored.dtype}, a floating "
                            f"weight is expected (a quantized checkpoint without its quantization config?)",
                            stage)
            fp32_ok = stored.dtype == "F32" and any(m in stored.name for m in keep_fp32)
            if want_dtype and stored.dtype != want_dtype and not fp32_ok:
                raise _fail(f"{stored.file}: tensor {stored.name!r} is stored as {stored.dtype}, {cfg_path.name} "
                            f"says dtype {cfg.get('dtype') or cfg.get('torch_dtype')}: the weights and the "
                            "config do not belong together", stage)
    extra = [n for n in entries if n not in expected_names and stored_as[n][0] not in expected_names
             and not any(p.search(n) for p in ignore_unexpected)]
    if extra:
        raise _fail(f"{entries[extra[0]].file}: holds {len(extra)} tensor(s) {cfg_path.name} has no place for "
                    f"(first: {extra[0]!r}): the weights and the config do not belong together", stage)


# ---- NaN / Inf ------------------------------------------------------------------------------------
def _non_finite(buf: memoryview, dtype: str) -> tuple[int, int]:
    """(NaN count, Inf count) of a buffer of `dtype` elements."""
    if dtype == "BF16":  # numpy has no bfloat16: exponent all ones is Inf (mantissa 0) or NaN
        bits = np.frombuffer(buf, dtype=np.uint16)
        special = (bits & 0x7F80) == 0x7F80
        if not special.any():
            return 0, 0
        nan = int(np.count_nonzero(special & ((bits & 0x007F) != 0)))
        return nan, int(np.count_nonzero(special)) - nan
    arr = np.frombuffer(buf, dtype={"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype])
    finite = np.isfinite(arr)
    if finite.all():
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(arr)))
    return nan, int(finite.size - np.count_nonzero(finite)) - nan


def scan_finite(entries: Iterable[TensorEntry], stage: Optional[str] = None) -> None:
    """Read every floating tensor in bounded chunks; NaN or Inf anywhere is an error naming the
    first tensor that has them."""
    bad: list[tuple[TensorEntry, int, int]] = []
    buf = None
    for e in sorted(entries, key=lambda e: (str(e.file), e.offset)):
        if e.dtype not in FLOAT_ST_DTYPES or not e.nbytes:
            continue
        item = ST_DTYPES[e.dtype][1]
        step = SCAN_CHUNK - SCAN_CHUNK % item
        nan = inf = 0
        try:
            with open(e.file, "rb") as fh:
                fh.seek(e.offset)
                done = 0
                while done < e.nbytes:
                    n = min(step, e.nbytes - done)
                    if buf is None or len(buf) < n:
                        buf = bytearray(max(n, min(step, 1 << 20)))
                    view = memoryview(buf)[:n]
                    got = fh.readinto(view)
                    if got != n:
                        raise _fail(f"{e.file}: truncated while reading tensor {e.name!r} (copy or save it again)",
                                    stage)
                    a, b = _non_finite(view, e.dtype)
                    nan, inf, done = nan + a, inf + b, done + n
        except OSError as exc:
            raise _fail(f"cannot read {e.file}: {one_line(exc)}", stage) from exc
        if nan or inf:
            bad.append((e, nan, inf))
    if bad:
        e, nan, inf = bad[0]
        numel = e.nbytes // ST_DTYPES[e.dtype][1]
        more = f"; {len(bad) - 1} more tensor(s) too" if len(bad) > 1 else ""
        raise _fail(f"{e.file}: tensor {e.name!r} holds {nan:,} NaN and {inf:,} Inf of {numel:,} values{more}: "
                    "the weights are damaged (saved after training diverged?)", stage)


def _scan_key(path: Path) -> str:
    st = path.stat()
    return sha256_json([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])[:32]


def _scan_record(path: Path) -> Path:
    return cache_root() / "verified" / f"{_scan_key(path)}.json"


def scan_files_once(entries: dict[str, TensorEntry], stage: Optional[str] = None) -> bool:
    """`scan_finite` for the files not already scanned clean since they last changed; returns
    whether any bytes were read."""
    by_file: dict[Path, list[TensorEntry]] = {}
    for e in entries.values():
        by_file.setdefault(e.file, []).append(e)
    scanned = False
    for path, file_entries in sorted(by_file.items()):
        record = _scan_record(path)
        if record.exists():
            continue
        scan_finite(file_entries, stage)
        scanned = True
        try:
            write_json(record, {"file": str(path), "tensors": len(file_entries), "finite": True})
        except OSError:
            pass  # an unwritable cache only costs a rescan next time
    return scanned


# ---- the whole checkpoint ------------------------------------------------------------------------
def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def verify_checkpoint(model_dir: Path, stage: Optional[str] = None, tokenizer: bool = True,
                      scan: bool = True) -> CheckpointSummary:
    """Check the checkpoint in `model_dir` (see the module docstring); one-line `PdcError` on
    the first fault."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    cfg = read_config(model_dir, stage)
    entries = weight_entries(model_dir, stage)
    check_against_config(model_dir, entries, cfg, stage)
    tok = load_tokenizer(model_dir, cfg, stage) if tokenizer else None
    scanned = scan_files_once(entries, stage) if scan else False
    return CheckpointSummary(model_dir, len(entries), sum(e.nbytes for e in entries.values()), scanned,
                             time.perf_counter() - t0, tok)


def load_tokenizer(model_dir: Path, cfg: Optional[dict] = None, stage: Optional[str] = None):
    """The tokenizer saved with the model, checked to fit its embedding."""
    from transformers import AutoTokenizer

    if not has_tokenizer(model_dir):
        raise _fail(f"{model_dir}: no tokenizer ({', '.join(TOKENIZER_FILES[:3])} ... missing): copy the "
                    "tokenizer files of the model it came from next to config.json", stage)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise _fail(f"cannot load the tokenizer in {model_dir}: {one_line(exc)}", stage) from exc
    check_tokenizer_fits(model_dir, tok, cfg if cfg is not None else read_config(model_dir, stage), stage)
    return tok


def check_tokenizer_fits(model_dir: Path, tokenizer, cfg: dict, stage: Optional[str] = None) -> None:
    """Every id the tokenizer can produce has a row in the embedding."""
    vocab = cfg.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise _fail(f"{model_dir}: the tokenizer has {len(tokenizer):,} tokens but config.json says vocab_size="
                    f"{vocab:,}: they belong to different models (copy the tokenizer of the model it came from)",
                    stage)


def check_same_vocabulary(teacher_dir: Path, teacher_tok, student_dir: Path, student_tok,
                          stage: Optional[str] = None) -> None:
    """Distillation compares the two models' logits id by id: both must map text to the same ids
    and have the same number of logits."""
    t_cfg, s_cfg = read_config(teacher_dir, stage), read_config(student_dir, stage)
    if t_cfg.get("vocab_size") != s_cfg.get("vocab_size"):
        raise _fail(f"the student ({student_dir}) has vocab_size={s_cfg.get('vocab_size')} but the teacher "
                    f"({teacher_dir}) has {t_cfg.get('vocab_size')}: distillation needs one vocabulary", stage)
    if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
        t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
        differ = sum(1 for k, v in s_vocab.items() if t_vocab.get(k) != v) + len(set(t_vocab) - set(s_vocab))
        raise _fail(f"the student's tokenizer ({student_dir}, {len(student_tok):,} tokens) differs from the "
                    f"teacher's ({teacher_dir}, {len(teacher_tok):,} tokens; {differ:,} entries differ): "
                    "distillation needs one vocabulary (copy the teacher's tokenizer files into the student)",
                    stage)


# ---- content identity -----------------------------------------------------------------------------
def content_hashes(path: Path, stage: Optional[str] = None) -> dict:
    """sha256 of the config (canonical JSON without volatile keys) and of every weight file; a
    single file (e.g. a GGUF) is identified by its bytes."""
    path = Path(path)
    if path.is_file():
        return {"config_sha256": None, "weights_sha256": {path.name: sha256_file(path)}}
    if not path.is_dir():
        raise _fail(f"source checkpoint not found: {path}", stage)
    cfg = read_config(path, stage)
    stable = {k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG_KEYS}
    weights = {p.name: sha256_file(p) for p in sorted(path.iterdir())
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
    if not weights:
        raise _fail(f"no weight files in {path}", stage)
    return {"config_sha256": hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": weights}


def content_differences(recorded: dict, actual: dict) -> list[str]:
    """Names of the files whose recorded hashes differ from `actual` (`config.json` for the config)."""
    out = []
    if recorded.get("config_sha256") != actual.get("config_sha256"):
        out.append("config.json")
    rec_w, act_w = recorded.get("weights_sha256") or {}, actual.get("weights_sha256") or {}
    out += sorted(n for n in set(rec_w) | set(act_w) if rec_w.get(n) != act_w.get(n))
    return out
