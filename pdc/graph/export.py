"""Export a Hugging Face causal LM to a `Program`, and seal a rewritten program back into an
`ExportedProgram`: the only two places pdc calls `torch.export.export`.

Export settings (transformers 5.x): SDPA attention (`ATTENTION`), the implementation a deployed
checkpoint runs, so importance, every emitted file and the lock all see the one graph that is
deployed. A model class that declares it cannot run SDPA (`_supports_sdpa = False`, e.g. for
attention logit soft-capping) is traced with its eager attention (`attention_for`), which is
also what Hugging Face runs for it: explicit matmuls, which structure discovery also reads. The attention core is one `aten.scaled_dot_product_attention` node; grouped-query
attention appears before it as `repeat_kv`'s explicit `expand`/`reshape` nodes (or as SDPA's
`enable_gqa`), whose shape constants the head pass rewrites (`pdc.graph.structure`).
Mixtures of experts are traced with transformers' `batched_mm` experts implementation
(`EXPERTS`): each (token, chosen expert) pair gathers its expert's weight slices
(`index(gate_up_proj, expert_ids)`) and multiplies them with `bmm`, so the graph is plain aten
ops of static rank whatever the routing decides. The other implementations do not fit: `eager`
loops over the experts a batch happens to hit (a data-dependent loop that export specialises
on the probe), and `grouped_mm` traces (on fp32 and on CPU) to transformers' own
`grouped_mm_fallback` custom op, which the ONNX exporter cannot lower and whose expert count is
baked into a `histc` node. `batched_mm` computes the same logits as the deployed default to
fp32 rounding (about 1e-7), at the cost of gathering one weight slice per token and chosen expert
(memory grows with tokens x top_k x expert size during calibration).
`use_cache=False`, and the wrapper (`LogitsOnly`) returns only the logits tensor. Batch and
sequence are dynamic dimensions, so one graph serves the probe, the calibration batches and every
output.

A source directory is exported on the meta device: parameters are created empty
(`accelerate.init_empty_weights(include_buffers=False)`: small computed buffers such as the rotary
`inv_freq` stay real) and the weights stay in the safetensors files, read on demand through
`pdc.graph.weights.WeightStore`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from pdc.arch import Arch
from pdc.errors import PdcError
from pdc.graph.probe import default_probe
from pdc.graph.program import STAGE, Program
from pdc.graph.weights import ConvertedWeights, WeightStore
from pdc.inputs.verify import module_names

# Counts every `torch.export.export` call pdc makes (tests assert how many a compile needs).
EXPORT_CALLS = {"trace": 0, "seal": 0}
ATTENTION = "sdpa"  # the attention implementation traced (see the module docstring)
EXPERTS = "batched_mm"  # the experts implementation traced (see the module docstring)


class LogitsOnly(torch.nn.Module):
    """An HF causal LM seen as `input_ids -> logits` (no KV cache, no mask): the one signature
    that the program, `.pt2`, ONNX and the lock share. The attribute name `m` becomes the
    get_attr prefix `m.` (see `Program.prefix`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False).logits


def attention_for(model_class) -> str:
    """The attention implementation traced for `model_class`: SDPA unless the class says it
    cannot run it (then its eager attention, as Hugging Face itself falls back)."""
    return ATTENTION if getattr(model_class, "_supports_sdpa", True) else "eager"


def dynamic_shapes():
    """Batch and sequence dynamic (sequence from 2: torch.export specialises sizes 0 and 1)."""
    from torch.export import Dim

    return ({0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=131072)},)


def _export(module: torch.nn.Module, probe: torch.Tensor, what: str) -> "torch.export.ExportedProgram":
    EXPORT_CALLS[what] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (probe,), strict=False, dynamic_shapes=dynamic_shapes())
    except Exception as exc:  # torch.export raises many types; the user gets one line
        first = (str(exc).strip().splitlines() or [""])[0]
        label = "torch.export failed" if what == "trace" else "sealing the rewritten program failed"
        raise PdcError(f"{label}: {type(exc).__name__}: {first}", STAGE) from exc


def export_model(model: torch.nn.Module, probe: Optional[torch.Tensor] = None,
                 hf_config: Optional[dict] = None) -> Program:
    """Export an in-memory HF causal LM (weights included) to a `Program` whose parameters are
    the model's own tensors (shared, not copied). `hf_config` is the config the program records
    for emitting (default `model.config.to_dict()`; pass the checkpoint's config.json to emit
    what the source said).

    Invariant: `program.forward(ids)` equals `model(ids).logits` for any batch/length."""
    config = model.config
    hf_config = config.to_dict() if hf_config is None else dict(hf_config)
    arch = source_arch(hf_config)
    probe = default_probe(arch.vocab) if probe is None else probe
    previous = getattr(config, "_attn_implementation", None), getattr(config, "_experts_implementation", None)
    config._attn_implementation = attention_for(type(model))
    config._experts_implementation = EXPERTS
    try:
        ep = _export(LogitsOnly(model).eval(), probe, "trace")
    finally:
        config._attn_implementation, config._experts_implementation = previous
    program = Program(gm=ep.module(), arch=arch, hf_config=hf_config, probe=probe, **embedding_names(model))
    program.kept = full_kept(arch)
    _drop_dead_nodes(program.gm)
    return program


def export_dir(model_dir: Path, probe: Optional[torch.Tensor] = None, progress: bool = False,
               dtype: torch.dtype = torch.float32) -> Program:
    """Export the checkpoint in `model_dir` on the meta device; `program.weights` reads its
    tensors on demand (call `materialize(program, dtype)` to load them all). The probe defaults to
    `default_probe` with the checkpoint's tokenizer (its real-text row). `dtype` is the precision
    the graph is traced in (its casts, e.g. a norm's upcast and cast back, are recorded for it)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise PdcError(f"no config.json in {model_dir}", STAGE)
    cfg_dict = json.loads((model_dir / "config.json").read_text())
    arch = source_arch(cfg_dict)
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._attn_implementation = attention_for(type(model))
    model.config._experts_implementation = EXPERTS
    model.eval()
    probe = default_probe(arch.vocab, model_dir) if probe is None else probe
    bar = _bar(progress, "export")
    ep = _export(LogitsOnly(model), probe, "trace")
    bar.update(1)
    bar.close()
    gm = ep.module()
    _retarget_devices(gm, torch.device("meta"), torch.device("cpu"))
    names = embedding_names(model)
    program = Program(gm=gm, arch=arch, hf_config=cfg_dict, probe=probe, **names)
    store = WeightStore(model_dir, tied=arch.tied, aliases=(names["embedding"], names["head"]))
    store.renames = checkpoint_renames(model, store.names())
    if not all(_resolves(store, n, program.param(n).shape) for n in program.param_nodes() if program.param(n).is_meta):
        store = ConvertedWeights(model_dir, dtype)  # a stored layout transformers converts (per-expert weights)
    program.weights = store
    program.kept = full_kept(arch)
    _drop_dead_nodes(gm)
    return program


def _resolves(store: WeightStore, name: str, shape: torch.Size) -> bool:
    """The store holds `name` (directly or renamed) with the module's shape."""
    try:
        return store.shape(name) == list(shape)
    except PdcError:
        return False


def embedding_names(model: torch.nn.Module) -> dict:
    """HF names of the input embedding and output head weights (Hugging Face's own accessors,
    whatever the family calls them)."""
    def name_of(module) -> str:
        return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight)

    out = {"embedding": name_of(model.get_input_embeddings())}
    head = model.get_output_embeddings()
    out["head"] = name_of(head) if head is not None else out["embedding"]
    if out["head"] == out["embedding"]:  # tied: named_parameters lists the head under its own name too
        out["head"] = next((n for n, p in model.named_parameters(remove_duplicate=False)
                            if p is head.weight and n != out["embedding"]), out["head"]) if head is not None else out["head"]
    return out


def checkpoint_renames(model: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """{module name: checkpoint key} for the keys that transformers renames when it loads this
    model (its own load-time renaming rules, e.g. GPT-NeoX's `embed_out.` -> `lm_head.`); keys it
    merges into one tensor are not renames (`ConvertedWeights` serves those)."""
    return {name: key for key, (name, merged) in module_names(model, keys).items() if name != key and not merged}


def materialize(program: Program, dtype: torch.dtype = torch.float32, progress: bool = False) -> None:
    """Load every meta parameter the graph reads from `program.weights` (as `dtype`)."""
    names = [n for n in program.param_nodes() if program.param(n).is_meta]
    for name in _bar_iter(progress, names, "load weights"):
        program.set_param(name, program.weights.load(name, dtype))


def seal(program: Program) -> "torch.export.ExportedProgram":
    """The rewritten program as an `ExportedProgram` (weights as they are, meta allowed): what
    `program.pt2`, ONNX and the lock's fingerprints are made from. Re-traces the fx graph, not
    the Hugging Face model, and re-checks everything torch.export checks."""
    return _export(program.gm, program.probe, "seal")


def _drop_dead_nodes(gm: torch.fx.GraphModule) -> None:
    """Remove unused nodes (a tied checkpoint leaves a dead read of one of its two names) and
    recompile. Export's symbolic node metadata stays valid, so no shape re-propagation."""
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _retarget_devices(gm: torch.fx.GraphModule, old: torch.device, new: torch.device) -> None:
    """Tracing on meta weights bakes `device=meta` into factory ops and metadata asserts; the
    program runs on real weights, so point them at `new`."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = tuple(new if a == old else a for a in node.args)
            if node.kwargs.get("device") == old:
                node.kwargs = {**node.kwargs, "device": new}


def full_kept(arch: Arch) -> dict:
    """kept_indices for the unpruned source (everything kept); a mixture of experts also lists
    its experts, each expert's neurons (by source expert id) and its shared expert's neurons."""
    def layer() -> dict:
        entry = {"mlp": list(range(arch.mlp)), "heads": list(range(arch.heads)),
                 "kv_heads": list(range(arch.kv_heads))}
        if arch.experts:
            entry["experts"] = list(range(arch.experts))
            entry["expert_mlp"] = {str(e): list(range(arch.expert_mlp)) for e in range(arch.experts)}
            if arch.shared_mlp:
                entry["shared_mlp"] = list(range(arch.shared_mlp))
        return entry

    return {"hidden": list(range(arch.hidden)), "layers": {str(i): layer() for i in range(arch.layers)}}


def source_arch(cfg: dict) -> Arch:
    """`Arch` of an HF config dict; a one-line `PdcError` when the config lacks a size."""
    try:
        return Arch.from_hf_config(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise PdcError(f"the model config lacks or mangles a size: {exc}", STAGE) from None


def _bar(progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=1, desc=desc, disable=not progress)


def _bar_iter(progress: bool, items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not progress)
