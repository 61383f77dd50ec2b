"""An independent reference for depth pruning (not a test module): the Hugging Face model of the
shorter config, loaded with the source's state dict minus the dropped layers, renumbered by hand."""

from __future__ import annotations

import copy

import torch


def hand_built(model, drop):
    """A fresh model with `num_hidden_layers - len(drop)` layers holding the source's weights."""
    from transformers import AutoModelForCausalLM

    n = model.config.num_hidden_layers
    keep = [i for i in range(n) if i not in drop]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers."):].split(".", 1)
            if int(idx) not in keep:
                continue
            name = f"model.layers.{keep.index(int(idx))}.{rest}"
        state[name] = tensor
    ref.load_state_dict(state, strict=True)
    return ref
