"""`python -m pdc.emit.pt2_child DIR [--onnx]`: load DIR/program.pt2, write its logits on the
check inputs and (with --onnx) export DIR/model.onnx from it, in a process of its own.

`pdc.emit.lean` runs this after the student is released: the one copy of the weights that
torch.export.load reads serves both the pt2 check and the ONNX export, and it is gone when the
process exits, whatever the exporter keeps (onnxscript's rewriter holds the last graph it
matched, with every weight, in a module global; numpy views make those storages unresizable).
Exchange files in DIR/exchange: inputs.pt (a list of id tensors) in; logits.pt (the logits of
the first input) and seconds.json out. A failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

EXCHANGE = "exchange"


def run(directory: Path, onnx: bool) -> None:
    exchange = directory / EXCHANGE
    inputs = torch.load(exchange / "inputs.pt", weights_only=True)
    seconds = {}
    start = time.perf_counter()
    ep = torch.export.load(str(directory / "program.pt2"))
    with torch.no_grad():
        torch.save(ep.module()(inputs[0]).float(), exchange / "logits.pt")
    seconds["program.pt2"] = time.perf_counter() - start
    if onnx:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, (inputs[0],), dynamo=True, input_names=["input_ids"],
                                        output_names=["logits"], optimize=True, verbose=False)
            program.save(str(directory / "model.onnx"), external_data=True)
        seconds["model.onnx"] = time.perf_counter() - start
    (exchange / "seconds.json").write_text(json.dumps(seconds))


def main(argv: list[str]) -> int:
    try:
        run(Path(argv[0]), "--onnx" in argv[1:])
    except Exception as exc:  # the parent turns this line into its error
        print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
