"""Reconstruct outputs: refit the projections that read pruned units, before they are sliced.

Before: the unpruned graph; for every layer to refit, the units the slicing passes after this
one will keep (`keep`: MLP neurons, query heads or a shared expert's neurons, ascending ids into
the current units) and the second moments G = sum_t x_t x_t^T of the reading projection's input
over the calibration tokens (`Importance.grams`, summed in the calibration pass that ranked the
units). Weights must be real or readable from `program.weights`.
After: in each such projection W (the MLP down projection, the attention output projection) the
columns K of the kept units hold the damped least-squares refit

    W'_K = W_K + W_P G_PK (G_KK + lambda I)^-1,     lambda = damp * mean(diag(G_KK)),

the W'_K minimising sum_t |W x_t - W'_K x_t,K|^2 + lambda |W'_K - W_K|^2 (P: the pruned units):
the kept units take over, as far as they linearly can, what the pruned ones wrote. Columns P
are left as they were (the slicing pass drops them); the graph, every other parameter and every
shape are unchanged (keeps the topology). A layer that keeps every unit is left bit for bit
(P is empty), so keep-all reconstruction is the identity.
Biases stay: the moments are not centred, so there is no mean to fold into them. Hidden channels
get no refit: a norm over the hidden channels rescales every kept channel by the RMS of the
pruned ones too, which no fixed linear map undoes exactly.
"""

from __future__ import annotations

import torch

from pdc.errors import PdcError
from pdc.graph.manager import PassResult
from pdc.graph.program import STAGE, Program
from pdc.graph.rewrite import expand_blocks, source_layer, take
from pdc.graph.structure import structure_of

KINDS = ("mlp", "heads", "shared_mlp")


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, float]:
    """The refit columns W'_K (float64) of `weight` [out, in] reading inputs with second moments
    `gram` [in, in], keeping input columns `keep`; with the relative output error on the
    calibration tokens of plain slicing and of the refit (sum |residual|^2 / sum |W x|^2)."""
    w = weight.detach().double()
    g = gram.detach().double()
    pruned = torch.ones(w.shape[1], dtype=torch.bool)
    pruned[keep] = False
    drop = pruned.nonzero().flatten()
    w_k, w_p = w[:, keep], w[:, drop]
    if drop.numel() == 0:
        return w_k, 0.0, 0.0
    g_kk = g[keep][:, keep]
    g_kp = g[keep][:, drop]
    ridge = damp * g_kk.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    lhs = g_kk + ridge * torch.eye(len(keep), dtype=torch.float64)
    rhs = g_kp @ w_p.T  # [K, out]
    try:
        delta = torch.linalg.solve(lhs, rhs).T
    except RuntimeError:  # singular (damp=0 with dead units): the minimum-norm solution
        delta = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution.T
    total = float(((w @ g) * w).sum())
    plain = float(((w_p @ g[drop][:, drop]) * w_p).sum())
    residual = torch.zeros_like(w)
    residual[:, keep] = -delta
    residual[:, drop] = w_p
    after = float(((residual @ g) * residual).sum())
    scale = total if total > 0 else 1.0
    return w_k + delta, plain / scale, after / scale


def _weight(program: Program, name: str) -> torch.Tensor:
    """A parameter's real values (read from the source when it is still on the meta device)."""
    tensor = program.param(name)
    if not tensor.is_meta:
        return tensor
    if program.weights is None:
        raise PdcError(f"reconstruct_outputs: {name} has no values to refit", STAGE)
    tensor = program.weights.load(name, torch.float32)
    for dim, idx in enumerate(program.meta.get("source_index", {}).pop(name, None) or []):
        if idx is not None:
            tensor = take(tensor, dim, idx)
    return tensor


class ReconstructOutputs:
    name = "reconstruct_outputs"
    keeps_topology = True  # rewrites values of kept columns only: no node, name or shape changes

    def __init__(self, keep: dict[tuple[str, int], torch.Tensor], grams: dict[tuple[str, int], torch.Tensor],
                 damp: float):
        self.keep = keep  # ("mlp" | "heads" | "shared_mlp", current layer) -> kept unit ids
        self.grams = grams
        self.damp = damp

    @torch.no_grad()
    def __call__(self, program: Program) -> PassResult:
        changed: dict = {}
        errors: dict[str, list] = {}
        for layer in structure_of(program).layers:
            readers = {"mlp": (layer.mlp.down, 1) if layer.mlp else None,
                       "heads": (layer.attn.o, layer.attn.head_dim),
                       "shared_mlp": (layer.moe.shared.down, 1) if layer.moe and layer.moe.shared else None}
            for kind, reader in readers.items():
                if (kind, layer.index) not in self.keep or reader is None:
                    continue
                if (kind, layer.index) not in self.grams:
                    raise PdcError(f"reconstruct_outputs: no calibration moments for layer {layer.index}'s {kind}",
                                   STAGE)
                name, block = reader
                keep = torch.as_tensor(self.keep[(kind, layer.index)], dtype=torch.long).sort().values
                columns = expand_blocks(keep, block) if block > 1 else keep
                weight = _weight(program, name)
                gram = self.grams[(kind, layer.index)]
                if gram.shape != (weight.shape[1], weight.shape[1]):
                    raise PdcError(f"reconstruct_outputs: moments {tuple(gram.shape)} do not match {name} "
                                   f"{tuple(weight.shape)}", STAGE)
                if len(columns) == weight.shape[1]:  # keeps every unit: nothing to refit (exact identity)
                    continue
                new, plain, after = refit(weight, gram, columns, self.damp)
                out = weight.clone()
                out[:, columns] = new.to(weight.dtype)
                program.set_param(name, out)
                key = source_layer(program, layer.index)
                changed.setdefault(key, {})[kind] = {"plain": round(plain, 6), "refit": round(after, 6)}
                errors.setdefault(kind, []).append((plain, after))
        summary = {kind: {"layers": len(pairs), "plain": sum(p for p, _ in pairs) / len(pairs),
                          "refit": sum(a for _, a in pairs) / len(pairs)} for kind, pairs in errors.items()}
        program.meta["reconstruct"] = summary
        return PassResult(self.name, {"layers": changed, "error": summary})
