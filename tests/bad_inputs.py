"""Bad run-time inputs made the way they happen: run the producer (`save_pretrained`, the corpus
writer, `pdc run`), then damage what it wrote (a cut download, a flipped byte, a file from
another save). Shared by the fast verification tests and the slow bad-input harness; no tests here.

Each fault is `Fault(name, target, damage, expect)`: `damage(path)` alters a model directory
(`target="model"`) or a JSONL corpus (`target="data"`), and `expect` is a regex the one-line
error must match.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Fault:
    name: str
    target: str  # "model" (a checkpoint directory) or "data" (a JSONL corpus)
    damage: Callable[[Path], None]
    expect: str  # regex the error message must match


# ---- checkpoints -------------------------------------------------------------------------------
def _truncate_to(fraction: float):
    def damage(d: Path) -> None:
        f = d / WEIGHTS
        os.truncate(f, int(f.stat().st_size * fraction))
    return damage


def _cut_tail(d: Path) -> None:
    f = d / WEIGHTS
    os.truncate(f, f.stat().st_size - 100)


def _append_bytes(d: Path) -> None:
    with open(d / WEIGHTS, "ab") as fh:
        fh.write(b"\0" * 64)


def _header_length(d: Path) -> None:
    with open(d / WEIGHTS, "r+b") as fh:
        fh.write(struct.pack("<Q", 1 << 40))


def _header_json(d: Path) -> None:
    with open(d / WEIGHTS, "r+b") as fh:
        fh.seek(8)
        fh.write(b"#")  # the header's opening brace


def _header_dtype(d: Path) -> None:
    """One tensor's dtype field flipped F32 -> F16 in place: the header no longer adds up."""
    data = bytearray((d / WEIGHTS).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    at = header.index(b'"F32"')
    header[at : at + 5] = b'"F16"'
    data[8 : 8 + n] = header
    (d / WEIGHTS).write_bytes(bytes(data))


def _edit_tensors(edit: Callable[[dict], None]):
    def damage(d: Path) -> None:
        tensors = load_file(str(d / WEIGHTS))
        edit(tensors)
        save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})
    return damage


def _first_mlp(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("mlp.up_proj.weight"))


def _poison(value: float):
    def edit(tensors: dict) -> None:
        tensors[_first_mlp(tensors)][3, 5] = value
    return edit


def _slice_rows(tensors: dict) -> None:
    k = _first_mlp(tensors)
    tensors[k] = tensors[k][:-8].contiguous()


def _to_dtype(dtype: torch.dtype):
    def edit(tensors: dict) -> None:
        k = _first_mlp(tensors)
        tensors[k] = tensors[k].to(dtype)
    return edit


def _drop_tensor(tensors: dict) -> None:
    del tensors[_first_mlp(tensors)]


def _fewer_layers_in_config(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def _resave_sharded(d: Path) -> dict:
    """Save the checkpoint again in several shards (the producer), returning its index."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d)
    (d / WEIGHTS).unlink()
    model.save_pretrained(d, max_shard_size="100KB")
    return json.loads((d / "model.safetensors.index.json").read_text())


def _missing_shard(d: Path) -> None:
    index = _resave_sharded(d)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, shards
    (d / shards[-1]).unlink()


def _tensor_in_no_shard(d: Path) -> None:
    index = _resave_sharded(d)
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    name = next(k for k, v in sorted(wm.items()) if v == shards[-1])
    wm[name] = shards[0]  # the index says shard 1, the tensor is in the last shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _remove_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)


def _oversized_tokenizer(d: Path) -> None:
    """The tokenizer saved again with more tokens than the model has embedding rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens([f"<extra_{i}>" for i in range(64)])
    tok.save_pretrained(d)


CHECKPOINT_FAULTS = [
    Fault("truncated to half", "model", _truncate_to(0.5), r"model\.safetensors: truncated: the header describes"),
    Fault("last 100 bytes cut", "model", _cut_tail, r"model\.safetensors: truncated"),
    Fault("bytes appended", "model", _append_bytes, r"model\.safetensors: 64 bytes after the last tensor"),
    Fault("corrupt header length", "model", _header_length, r"model\.safetensors: the header length field says"),
    Fault("corrupt header JSON", "model", _header_json, r"model\.safetensors: the header is not valid JSON"),
    Fault("header dtype flipped", "model", _header_dtype,
          r"model\.safetensors: tensor .* needs [\d,]+ bytes but its offsets span"),
    Fault("index names a missing shard", "model", _missing_shard, r"index\.json: names the shard .* which is missing"),
    Fault("index maps a tensor to a shard without it", "model", _tensor_in_no_shard,
          r"index\.json: maps tensor .* which does not hold it"),
    Fault("tensor shape disagrees with config", "model", _edit_tensors(_slice_rows),
          r"has shape \[88, 64\], config\.json calls for \[96, 64\]"),
    Fault("tensor dtype disagrees with config", "model", _edit_tensors(_to_dtype(torch.float16)),
          r"is stored as F16, config\.json says dtype float32"),
    Fault("integer weight", "model", _edit_tensors(_to_dtype(torch.int8)),
          r"is stored as I8, a floating weight is expected"),
    Fault("tensor missing", "model", _edit_tensors(_drop_tensor),
          r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' .* is in no weight file"),
    Fault("config has fewer layers than the weights", "model", _fewer_layers_in_config,
          r"holds 9 tensor\(s\) config\.json has no place for"),
    Fault("tokenizer missing", "model", _remove_tokenizer, r": no tokenizer \(tokenizer\.json"),
    Fault("tokenizer larger than the vocabulary", "model", _oversized_tokenizer,
          r"the tokenizer has [\d,]+ tokens but config\.json says vocab_size=128"),
    Fault("NaN in a weight", "model", _edit_tensors(_poison(float("nan"))), r"holds 1 NaN and 0 Inf of 6,144 values"),
    Fault("Inf in a weight", "model", _edit_tensors(_poison(float("inf"))), r"holds 0 NaN and 1 Inf of 6,144 values"),
]


# ---- corpora -----------------------------------------------------------------------------------
def _rewrite_lines(edit: Callable[[list[str]], None]):
    def damage(path: Path) -> None:
        lines = path.read_text().splitlines()
        edit(lines)
        path.write_text("".join(line + "\n" for line in lines))
    return damage


def _set_line(lineno: int, text: str):
    def edit(lines: list[str]) -> None:
        lines[lineno - 1] = text
    return edit


def _cut_line(lineno: int):
    def edit(lines: list[str]) -> None:
        lines[lineno - 1] = lines[lineno - 1][: len(lines[lineno - 1]) // 2]
    return edit


def _rename_field(lines: list[str]) -> None:
    lines[:] = [json.dumps({"body": json.loads(line)["text"]}) for line in lines]


def _blank_texts(lines: list[str]) -> None:
    lines[:] = [json.dumps({"text": "   "}) for _ in lines]


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _only_newlines(path: Path) -> None:
    path.write_text("\n\n\n")


def _latin1_line(path: Path) -> None:
    """Line 12 written by a Latin-1 editor."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines[11] = '{"text": "caf\u00e9 au lait"}\n'.encode("latin-1")
    path.write_bytes(b"".join(lines))


DATA_FAULTS = [
    Fault("empty file", "data", _empty, r"corpus\.jsonl is empty \(0 bytes\)"),
    Fault("only blank lines", "data", _only_newlines, r"corpus\.jsonl holds no JSON records"),
    Fault("malformed JSON line", "data", _rewrite_lines(_cut_line(17)), r"corpus\.jsonl:17:\d+: not valid JSON"),
    Fault("field is a number", "data", _rewrite_lines(_set_line(5, '{"text": 42}')),
          r"corpus\.jsonl:5: field 'text' is a number \(42\), not a string"),
    Fault("field is null", "data", _rewrite_lines(_set_line(8, '{"text": null}')),
          r"corpus\.jsonl:8: field 'text' is null"),
    Fault("field missing on one line", "data", _rewrite_lines(_set_line(9, '{"body": "x"}')),
          r"corpus\.jsonl:9: no field 'text' \(fields: 'body'\)"),
    Fault("field missing everywhere", "data", _rewrite_lines(_rename_field), r"has no field 'text' \(fields: body\)"),
    Fault("a line is an array", "data", _rewrite_lines(_set_line(3, '["a", "b"]')),
          r"corpus\.jsonl:3: a list where a JSON object"),
    Fault("not UTF-8", "data", _latin1_line, r"corpus\.jsonl:12: not UTF-8 text"),
    Fault("no text at all", "data", _rewrite_lines(_blank_texts),
          r"corpus\.jsonl has no text: every 'text' value is empty"),
]


# Text too short for what a stage asks: the message must say how many were found and asked.
def _few_documents(path: Path) -> None:
    """Three short documents: about two blocks of 32 tokens where 8 calibration samples are asked."""
    path.write_text("".join(json.dumps({"text": "the cat sat on a mat by the door"}) + "\n" for _ in range(3)))


def _shorter_than_a_block(path: Path) -> None:
    path.write_text(json.dumps({"text": "the cat"}) + "\n")


FOUND_AND_ASKED = r"(?i)(?=.*\b(found|available|only|has|have)\b)(?=.*\b(asked|requested|needs?|wants?)\b)(?=(.*\d){2})"
FEW_CALIBRATION_SAMPLES = Fault("fewer blocks than calibration samples", "data", _few_documents, FOUND_AND_ASKED)
SHORTER_THAN_A_SEQUENCE = Fault("text shorter than one sequence", "data", _shorter_than_a_block, FOUND_AND_ASKED)


# ---- build directories -------------------------------------------------------------------------
def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory under `root`: relative path -> sha256 (or "dir")."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[str((Path(dirpath) / d).relative_to(root))] = "dir"
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def swap_tokenizer(model_dir: Path) -> None:
    """The student's tokenizer replaced by one of the same size whose ids come in another order
    (saved by `save_pretrained`, as a user copying the wrong files would get): a length check
    alone would not notice."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny_tokenizer

    vocab = make_tiny_tokenizer().get_vocab()
    reordered = {t: len(vocab) - 1 - i for t, i in vocab.items()}
    inner = Tokenizer(models.WordLevel(reordered, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    inner.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(model_dir)
