"""Identities and fingerprints: what the lock pins, computed once where the data is.

- `model_identity(dir)`: a checkpoint directory by content (config without tool-version keys,
  every weight file), for the model a prune stage reads;
- `tokens_identity(ids)`: calibration or probe token ids by content;
- `program_fingerprint(program, ep, blocks)`: the rewritten program's structure (the sealed
  `ExportedProgram`'s op/shape list, every parameter's shape as the checkpoint stores it) and numbers (logits on the probe,
  next-token loss on the probe and on the first calibration blocks), from the program itself: no
  checkpoint is reloaded and nothing is traced again.

Invariant: equal inputs give equal identities and fingerprints (symbolic sizes are renamed
canonically, so the fingerprint depends neither on the probe's shape nor on tracing history).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from pdc.emit.checkpoint import checkpoint_tensors
from pdc.errors import PdcError
from pdc.files import sha256_file, sha256_json
from pdc.graph.program import STAGE, Program
from pdc.plan.results import (
    LogitsSummary,
    ModelIdentity,
    PruneInputs,
    ProgramFingerprint,
    TokensIdentity,
)

# Config keys that change with the tool that saved the checkpoint, not with the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LOGITS_SLICE = 8  # logits of the first vocab entries at each probe row's last position
FINGERPRINT_BLOCKS = 4  # calibration blocks whose next-token loss the fingerprint records
# fp32 logits per forward of the calibration loss: as many whole blocks as fit (at least one; a
# block longer than fits alone is cut to the tokens that do: 523 at Llama 3's 128K vocabulary),
# so the loss costs a few times this, whatever the calibration's seq_len. SmolLM2's 4 x 256
# tokens (the examples' locks) fit in one forward, as they always ran.
LOSS_LOGITS_BYTES = 256 * 2**20


# ---- inputs ------------------------------------------------------------------------------
def model_identity(model_dir: Path) -> ModelIdentity:
    """sha256 of the config (canonical JSON without volatile keys) and of every weight file."""
    model_dir = Path(model_dir)
    if model_dir.is_file():  # a single-file source (e.g. GGUF): its bytes are its identity
        weights = {model_dir.name: sha256_file(model_dir)}
        return ModelIdentity(sha256=sha256_json([None, weights]), config_sha256=None, weights_sha256=weights)
    if not (model_dir / "config.json").exists():
        raise PdcError(f"no Hugging Face checkpoint in {model_dir} (config.json missing)", STAGE)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except ValueError as exc:
        raise PdcError(f"{model_dir / 'config.json'} is not valid JSON ({exc})", STAGE) from None
    stable = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    config_sha = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
    weights = {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
    if not weights:
        raise PdcError(f"no weight files in {model_dir}", STAGE)
    return ModelIdentity(sha256=sha256_json([config_sha, weights]), config_sha256=config_sha, weights_sha256=weights)


def tokens_identity(ids: Optional[torch.Tensor]) -> Optional[TokensIdentity]:
    if ids is None:
        return None
    data = ids.detach().to(torch.int64).contiguous().numpy().tobytes()
    return TokensIdentity(shape=tuple(ids.shape), sha256=hashlib.sha256(data).hexdigest())


def files_identity(directory: Optional[Path]) -> Optional[dict[str, str]]:
    """sha256 of every file under `directory` by relative path (None without a directory)."""
    if directory is None or not Path(directory).is_dir():
        return None
    root = Path(directory)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def prune_inputs(model_dir: Path, calibration: Optional[torch.Tensor], probe: torch.Tensor,
                 tasks_dir: Optional[Path] = None) -> PruneInputs:
    return PruneInputs(model=model_identity(model_dir), calibration=tokens_identity(calibration),
                       probe=tokens_identity(probe), tasks=files_identity(tasks_dir))


# ---- the program -------------------------------------------------------------------------
def graph_fingerprint(ep: "torch.export.ExportedProgram") -> dict:
    """Operators and output shapes of `ep`'s graph, canonically.

    Each `call_function` node becomes `"<op>:<dtype>[d0,d1,...]"` in graph order; symbolic sizes
    are renamed `b0, b1, ...` by first appearance (torch's own symbol names depend on tracing
    history), and assertion/metadata nodes that have no output are skipped. Returns
    `{"hash": sha256 of the list, "nodes": len, "op_counts": {op: n}, "dynamic": bool}`.
    Invariant: two programs have the same hash iff they have the same op sequence and shapes."""
    symbols: dict[str, str] = {}
    entries: list[str] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue  # _assert_* and other side-effect nodes carry no output tensor
        dims = [str(d) if isinstance(d, int) else symbols.setdefault(str(d), f"b{len(symbols)}") for d in val.shape]
        dtype = str(val.dtype).replace("torch.", "")
        entries.append(f"{_op_name(node.target)}:{dtype}[{','.join(dims)}]")
    counts: dict[str, int] = {}
    for entry in entries:
        op = entry.split(":", 1)[0]
        counts[op] = counts.get(op, 0) + 1
    return {
        "hash": hashlib.sha256("\n".join(entries).encode()).hexdigest(),
        "nodes": len(entries),
        "op_counts": dict(sorted(counts.items())),
        "dynamic": is_dynamic(ep),
    }


def is_dynamic(ep: "torch.export.ExportedProgram") -> bool:
    """Whether any user input of `ep` has a symbolic (dynamic) size."""
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(not isinstance(d, int) for d in val.shape):
                return True
    return False


@torch.no_grad()
def program_fingerprint(program: Program, ep: "torch.export.ExportedProgram",
                        calibration: Optional[torch.Tensor] = None) -> ProgramFingerprint:
    """The fingerprint of `program` (real weights) sealed as `ep` (`pdc.graph.export.seal`)."""
    if program.on_meta():
        raise PdcError("cannot fingerprint a program whose weights were never loaded", STAGE)
    graph = graph_fingerprint(ep)
    probe = program.probe
    logits = program.forward(probe).float()
    blocks = calibration[:FINGERPRINT_BLOCKS].long() if calibration is not None and calibration.numel() else None
    calib_loss = None
    if blocks is not None:
        blocks = blocks[:, :max(2, LOSS_LOGITS_BYTES // (4 * program.arch.vocab))]  # bounded memory
        calib_loss = calibration_loss(program, blocks)
    last = logits[:, -1, :]
    return ProgramFingerprint(
        graph_sha256=graph["hash"], nodes=graph["nodes"], op_counts=graph["op_counts"], dynamic=graph["dynamic"],
        param_shapes={name: list(t.shape) for name, t in sorted(checkpoint_tensors(program).items())},
        logits=LogitsSummary(
            mean=float(logits.mean()), std=float(logits.std()), abs_max=float(logits.abs().max()),
            rms=float(logits.pow(2).mean().sqrt()), last_slice=last[:, :LOGITS_SLICE].tolist(),
            last_logsumexp=torch.logsumexp(last, dim=-1).tolist(),
        ),
        probe_loss=next_token_loss(logits, probe),
        calibration_loss=calib_loss,
        calibration_blocks=0 if blocks is None else int(blocks.shape[0]),
    )


def calibration_loss(program: Program, blocks: torch.Tensor) -> float:
    """Mean next-token loss over `blocks` [n, seq], as many whole blocks per forward as have
    `LOSS_LOGITS_BYTES` of fp32 logits (at least one)."""
    per = max(1, LOSS_LOGITS_BYTES // (4 * blocks.shape[1] * program.arch.vocab))
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], per):
        chunk = blocks[start:start + per]
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total += next_token_loss(program.forward(chunk), chunk) * n
        count += n
    return total / count


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def _op_name(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)  # "aten.linear.default"
    return getattr(target, "__name__", str(target))
