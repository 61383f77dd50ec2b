"""Recompute the buffers Hugging Face derives from the config, for the config pdc will emit.

Some constants of a model are not weights but buffers its modules compute from the config when
they are built: rotary frequencies (from head_dim), Gemma's embedding scale sqrt(hidden_size).
The exported graph reads them as attributes, with the source's values; the emitted checkpoint
does not store them (they are non-persistent) and Hugging Face recomputes them from the emitted
config when it loads the model. So after the sizes change, the program must read what the
emitted config gives, or the checkpoint would not compute what the rewritten graph computes.

Before: the program's parameters and `arch` have their final sizes; its buffers hold the
source's values. After: every buffer the graph reads that a model built from the emitted config
(`Arch.to_hf_config`, built on the meta device with real buffers) also has is replaced by that
model's value (same shape required; dtype kept). Parameters and nodes are untouched, so a source
whose buffers do not depend on the pruned sizes is unchanged.
"""

from __future__ import annotations

import torch

from pdc.errors import PdcError
from pdc.graph.manager import PassResult
from pdc.graph.program import STAGE, Program
from pdc.plan.counts import hf_config


class RecomputeBuffers:
    name = "recompute_buffers"
    keeps_topology = True  # replaces buffer values only

    def __call__(self, program: Program) -> PassResult:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = hf_config(program.arch.to_hf_config(program.hf_config))
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        fresh = dict(model.named_buffers(remove_duplicate=False))
        params = {name for name, _ in program.gm.named_parameters(remove_duplicate=False)}
        changed = {}
        for name in program.param_nodes():
            if program.prefix + name in params or name not in fresh or fresh[name].is_meta:
                continue
            old, new = program.param(name), fresh[name]
            if tuple(new.shape) != tuple(old.shape):
                raise PdcError(f"recompute_buffers: {name} is {tuple(new.shape)} for the emitted config, "
                               f"{tuple(old.shape)} in the graph", STAGE)
            new = new.to(old.dtype)
            if not torch.equal(new, old):
                program.set_param(name, new)
                changed[name] = new.flatten()[:4].tolist()
        return PassResult(self.name, {"buffers": changed})
