"""Teacher correction: fine-tune the teacher on the distillation data before distilling.

Methods (`cfg.method`): `full` (every weight), `lora` (peft adapters of rank `cfg.lora_rank`,
alpha = 2 x rank, on every projection of the decoder layers, merged into the weights at the end,
so the output is a plain HF checkpoint with the source's parameter count), `norm` (only the norm
weights and biases train). The projections and norms are those structure discovery finds in the
model's graph (`correction_targets`), whatever the family names its modules. The paper's defaults (peak
LR one fifth of distillation's, 120 warm-up steps) are filled in by the checker
(`pdc.lang.settings.paper_correction`). Output in `out_dir`: `model/`, `log.jsonl`, `loss.png`.
"""

from __future__ import annotations

from pathlib import Path

from pdc.errors import PdcError
from pdc.graph.export import export_dir
from pdc.graph.structure import structure_of
from pdc.inputs.shards import Blocks
from pdc.lang.settings import TrainConfig
from pdc.plan.results import TrainResult
from pdc.plan.training import Launch
from pdc.stages.train.execute import execute


def run_correct(model_dir: Path, train_blocks: Blocks, val_blocks: Blocks, cfg: TrainConfig, work_dir: Path,
                out_dir: Path, progress: bool = True, launch: Launch = Launch()) -> TrainResult:
    """Fine-tune `model_dir` on the blocks (validation loss before and after in the result)."""
    return execute("correct", {"model_dir": model_dir}, train_blocks, val_blocks, cfg, work_dir,
                   out_dir, progress, launch, targets=correction_targets(model_dir, cfg.method))


def correction_targets(model_dir: Path, method: str) -> dict:
    """What `lora` adapts and `norm` trains, from the structure of the model's graph (exported
    on the meta device, no weights read): {"lora_modules": [module names of every projection],
    "lora_parameters": [a mixture's router and stacked expert weights]}
    or {"norm_params": [every norm weight and bias]}; {} for `full`. A graph pdc cannot
    classify is the same one-line error pruning gives."""
    if method not in ("lora", "norm"):
        return {}
    try:
        structure = structure_of(export_dir(Path(model_dir)))
    except PdcError as exc:
        raise PdcError(f"cannot find the {method} correction targets: {exc.message}", "correct") from None
    if method == "lora":
        return {"lora_modules": [name.rsplit(".", 1)[0] for name in structure.projections()],
                "lora_parameters": structure.expert_parameters()}
    return {"norm_params": structure.norms()}
