"""The prune stage's memory scales with the student and one layer, not with the source: a bf16
checkpoint four times the cap is pruned (streamed, the student kept in bf16) and its checkpoint
and fingerprint written while the process stays under the cap.

The cap is on the kernel's own high-water mark (VmHWM, reset by `clear_refs` 5 once a smaller
model of the same graph was pruned in the same process, so imports, tracing caches and the
allocator's warm-up are not counted). Linux enforces no RSS rlimit, and an address-space rlimit
would count torch's reservations, not memory used.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {bench!r})
    from bench_prune_8b import make_checkpoint, weight_shapes
    from pdc.stages.prune_width import prune_width
    from pdc.lang.settings import ImportanceConfig, WidthTarget

    torch.set_num_threads(1)
    tmp, deploy = Path(sys.argv[1]), sys.argv[2] == "deploy"
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=2048,
                num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_hidden_layers=6,
                max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_theta=10000.0, hidden_act="silu")
    big = dict(base, hidden_size=1024, intermediate_size=4096)
    small = dict(base, hidden_size=512, intermediate_size=1024)
    target = WidthTarget(hidden=256, mlp=512)
    calib = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(0))

    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

    out = {{}}
    for name, cfg in (("small", small), ("big", big)):
        make_checkpoint(tmp / name, cfg)
        open("/proc/self/clear_refs", "w").write("5")
        before = rss()
        r = prune_width(tmp / name, calib, target, ImportanceConfig(method="activation"), tmp / (name + "-out"),
                        progress=False, stream_weights=True, deploy=deploy)
        source = sum(2 * torch.Size(s).numel() for s in weight_shapes(cfg).values())
        out[name] = dict(peak=hwm() - before, source=source, params_after=r.params_after,
                         artifacts=sorted(r.artifacts), dtypes=sorted({{str(t.dtype) for t in
                         __import__("safetensors.torch", fromlist=["load_file"]).load_file(
                             str(tmp / (name + "-out") / "model" / "model.safetensors")).values()}}))
    print(json.dumps(out))
""")


def _run(tmp_path: Path, mode: str) -> dict:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(bench=str(ROOT / "bench")))
    res = subprocess.run([sys.executable, str(script), str(tmp_path), mode], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check(got: dict, share: float = 0.25) -> None:
    big = got["big"]
    cap = int(big["source"] * share)
    assert big["dtypes"] == ["torch.bfloat16"]  # bf16 stays bf16
    assert big["peak"] <= cap, f"pruning a {big['source'] / 2**20:.0f} MiB source peaked at " \
                               f"{big['peak'] / 2**20:.0f} MiB over its start, cap {cap / 2**20:.0f} MiB"


def test_prune_under_a_quarter_of_the_source(tmp_path):
    _check(_run(tmp_path, "nodeploy"))


@pytest.mark.slow
def test_prune_and_verify_every_file_under_two_fifths_of_the_source(tmp_path):
    """With program.pt2 and ONNX written and each file loaded back and checked (the ONNX export
    and onnxruntime's session add tens of MiB that a quarter of this small source does not
    hold; not yet shown to be independent of the size)."""
    got = _run(tmp_path, "deploy")
    assert got["big"]["artifacts"] == ["model", "model.onnx", "program.pt2"]
    _check(got, share=0.4)
