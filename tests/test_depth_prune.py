"""Depth pruning: saliency choices against brute force on hand-built shorter models, and the depth
build that `pdc compile` makes (checkpoint = rewritten program = hand-built reference, parameter
count = the plan's, cached and uncached decoding agree)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import make_tiny_model, make_tiny_tokenizer, save_tiny_checkpoint
from depth_reference import hand_built
from graph_exports import exported
from pdc.cli import main as pdc_main
from pdc.errors import PdcError
from pdc.files import sha256_file
from pdc.lang.settings import DepthTarget, Saliency
from pdc.plan.results import read_record
from pdc.stages.lm_tasks import task_accuracy
from pdc.graph.export import export_model
from pdc.stages.depth_on_program import block_influence, without
from pdc.stages.prune_depth import candidates, prune_depth, saliency_table
from eval_support import write_mc_task
from tiny_builds import write_corpus


def _blocks(n=4, length=12, seed=0):
    return torch.randint(3, 98, (n, length), generator=torch.Generator().manual_seed(seed))


def _brute_force_losses(model, blocks, cands):
    """Mean next-token NLL of the hand-built model for each candidate."""
    out = []
    with torch.no_grad():
        for cand in cands:
            logits = hand_built(model, cand)(input_ids=blocks).logits
            out.append(float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))))
    return out


def test_candidates_enumeration():
    assert candidates(5, 3, True) == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert candidates(5, 3, False) == [[0], [1], [2], [3], [4]]
    assert candidates(4, 4, True) == []
    for bad in (0, 5):
        with pytest.raises(PdcError, match="depth"):
            candidates(4, bad, True)


@pytest.mark.parametrize("family, contiguous", [("llama", True), ("qwen2", False), ("mistral", False), ("qwen2", True)])
def test_loss_choice_equals_brute_force(family, contiguous):
    """The dropped layers are the argmin of the brute-force loss table (contiguous block) or the
    `drop` single layers with the lowest brute-force loss (non-contiguous)."""
    model = make_tiny_model(family, num_hidden_layers=5)
    blocks = _blocks()
    target = DepthTarget(depth=3, saliency=Saliency("loss"), contiguous=contiguous)
    table = saliency_table(export_model(model), target, blocks, progress=False)
    cands = candidates(5, 3, contiguous)
    ref = _brute_force_losses(model, blocks, cands)
    assert [c["layers"] for c in table["candidates"]] == cands
    assert torch.allclose(torch.tensor([c["value"] for c in table["candidates"]]), torch.tensor(ref), rtol=1e-4)
    if contiguous:
        expected = cands[min(range(len(ref)), key=ref.__getitem__)]
    else:
        expected = sorted(cands[i][0] for i in sorted(range(len(ref)), key=ref.__getitem__)[:2])
    assert table["dropped_layers"] == expected
    # the metric after dropping them all together, measured on the hand-built model
    (after,) = _brute_force_losses(model, blocks, [expected])
    assert table["after_drop"] == pytest.approx(after, rel=1e-4)
    assert table["baseline"] == pytest.approx(_brute_force_losses(model, blocks, [[]])[0], rel=1e-4)


@settings(max_examples=6, deadline=None)
@given(drop=st.sets(st.integers(0, 3), min_size=1, max_size=3), family=st.sampled_from(["llama", "mistral", "qwen2"]))
def test_candidate_equals_hand_built_and_leaves_the_program(drop, family):
    """A candidate (`without`: what saliency measures) computes the hand-built smaller model;
    the program it was cut from still computes the full model."""
    model = make_tiny_model(family)
    program = exported(family)  # the export of this same model (seed 0), once per family
    ids = _blocks(2, 10, seed=len(drop))
    with torch.no_grad():
        before = program.forward(ids)
        inside = without(program, sorted(drop)).forward(ids)
        after = program.forward(ids)
        ref = hand_built(model, sorted(drop))(input_ids=ids).logits
    torch.testing.assert_close(inside, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, after)
    assert program.arch.layers == 4


def test_block_influence_matches_hidden_states():
    """BI of a run = 1 - cos(h before its first layer, h after its last layer), token mean."""
    model = make_tiny_model("llama")
    blocks = _blocks(3, 8)
    runs = [[0], [1, 2], [2, 3], [3]]
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda m, args: captured.update(last=args[0]))
    with torch.no_grad():
        hs = list(model(input_ids=blocks, output_hidden_states=True).hidden_states)
    hook.remove()
    hs[-1] = captured["last"]  # HF's last hidden state is after the final norm; BI wants before
    ref = [float((1 - F.cosine_similarity(hs[r[0]].double(), hs[r[-1] + 1].double(), dim=-1)).mean()) for r in runs]
    got = block_influence(export_model(model), blocks, runs, batch_size=2)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), rtol=1e-6)


def test_cosine_saliency_drops_the_lowest_influence_block():
    model = make_tiny_model("mistral", num_hidden_layers=5)
    blocks = _blocks()
    program = export_model(model)
    table = saliency_table(program, DepthTarget(3, Saliency("cosine"), contiguous=True), blocks, progress=False)
    cands = candidates(5, 3, True)
    influence = block_influence(program, blocks, cands)
    assert table["dropped_layers"] == cands[influence.index(min(influence))]
    assert table["baseline"] is None and table["after_drop"] is None


DEPTH_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune depth {{ depth=2 contiguous={contiguous} saliency=loss(corpus, samples=4, seq_len=16) }}
"""


@pytest.mark.parametrize("family, contiguous", [("llama", "true"), ("mistral", "false"), ("qwen2", "true")])
def test_compiled_depth_checkpoint_is_the_rewritten_program(tmp_path, family, contiguous):
    """`pdc compile` of a depth spec: the emitted checkpoint reproduces the rewritten program
    (`program.pt2`, the sealed program) to 1e-5 on a batch and length the probe never had, and
    the hand-built shorter model; its parameter count is the plan's; the config's layer count and
    per-layer lists follow; greedy decoding with and without the KV cache gives the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_checkpoint(tmp_path / "tiny", family)
    write_corpus(tmp_path / "corpus.jsonl")
    spec = tmp_path / "tiny.pds"
    spec.write_text(DEPTH_SPEC.format(contiguous=contiguous))
    assert pdc_main(["compile", str(spec)]) == 0
    build = tmp_path / "build" / "tiny"
    result = read_record(build / "prune").result
    dropped = list(result.saliency.dropped_layers)
    assert json.loads((build / "prune" / "kept_indices.json").read_text())["dropped_layers"] == dropped

    pruned = AutoModelForCausalLM.from_pretrained(build / "prune" / "model", dtype=torch.float32).eval()
    program = torch.export.load(str(build / "prune" / "program.pt2")).module()
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32).eval()
    ids = _blocks(3, 13, seed=3)
    with torch.no_grad():
        logits = pruned(input_ids=ids).logits
        torch.testing.assert_close(logits, program(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, hand_built(source, dropped)(input_ids=ids).logits, rtol=0, atol=1e-5)
    plan = json.loads((build / "plan.json").read_text())
    assert sum(p.numel() for p in pruned.parameters()) == result.params_after == plan["final"]["params_total"]
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    if isinstance(getattr(source.config, "layer_types", None), list):
        kept = [i for i in range(4) if i not in dropped]
        assert pruned.config.layer_types == [source.config.layer_types[i] for i in kept]

    tok = AutoTokenizer.from_pretrained(build / "prune" / "model")
    prompt = tok("Hello there", return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        cached = pruned.generate(**prompt, use_cache=True, **kwargs)
        uncached = pruned.generate(**prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)


def _save_source(tmp_path, family, layers=4):
    src = tmp_path / "src"
    make_tiny_model(family, num_hidden_layers=layers).save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    return src


def test_prune_depth_non_contiguous_with_task_saliency(tmp_path):
    """Task saliency through lm-eval on a local MC task: the chosen single layers are those whose
    removal keeps accuracy highest, and the recorded accuracy with all of them removed is the
    hand-built shorter model's."""
    src = _save_source(tmp_path, "llama", layers=3)
    tasks = write_mc_task(tmp_path / "tasks")
    target = DepthTarget(2, Saliency("task", task="tiny_mc", shots=0, limit=6), contiguous=False)
    result = prune_depth(src, target, None, tmp_path / "prune", tasks_dir=tasks, progress=False, deploy=False)
    sal = result.saliency
    values = [c.value for c in sal.candidates]
    best = max(range(len(values)), key=lambda i: (values[i], i))  # ties go to the later layer
    assert list(sal.dropped_layers) == [best]
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reference = task_accuracy(hand_built(source, [best]), make_tiny_tokenizer(), "tiny_mc", 0, tasks, 6)
    assert sal.chosen == pytest.approx(reference)
    assert sal.items == 6  # each candidate scored on the 6 items (its accuracy's standard error)
    assert result.inputs.tasks == {name: sha256_file(tasks / name) for name in ("tiny_mc.jsonl", "tiny_mc.yaml")}


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 matrix units")
def test_task_saliency_in_bf16_scores_a_bf16_copy_and_prunes_the_fp32_weights(tmp_path, monkeypatch):
    """`task(..., precision=bf16)`: every candidate is scored on a bf16 model, while the pruned
    checkpoint keeps the source's fp32 weights (the same as an fp32-scored run dropping the
    same layers)."""
    import pdc.stages.depth_on_program as on_program
    import pdc.stages.prune_depth as depth

    src = _save_source(tmp_path, "llama", layers=3)
    tasks = write_mc_task(tmp_path / "tasks")
    dtypes = []
    real = on_program.task_accuracy_items
    monkeypatch.setattr(on_program, "task_accuracy_items",
                        lambda model, *a, **k: dtypes.append(next(model.parameters()).dtype) or real(model, *a, **k))
    target = DepthTarget(2, Saliency("task", task="tiny_mc", shots=0, limit=6, precision="bf16"), contiguous=True)
    result = prune_depth(src, target, None, tmp_path / "bf16", tasks_dir=tasks, progress=False, deploy=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    dropped = list(result.saliency.dropped_layers)
    fp32 = DepthTarget(2, Saliency("loss"), contiguous=True)
    monkeypatch.setattr(depth, "choose", lambda *a, **k: dropped)
    blocks = torch.randint(0, 64, (2, 8))
    reference = prune_depth(src, fp32, blocks, tmp_path / "fp32", progress=False, deploy=False)
    assert list(reference.saliency.dropped_layers) == dropped
    a, b = (sha256_file(d / "model" / "model.safetensors") for d in (tmp_path / "bf16", tmp_path / "fp32"))
    assert a == b


def test_prune_depth_errors(tmp_path):
    src = _save_source(tmp_path, "llama")
    with pytest.raises(PdcError, match="needs data blocks"):
        prune_depth(src, DepthTarget(2, Saliency("loss")), None, tmp_path / "out", progress=False)
    with pytest.raises(PdcError, match="depth 9"):
        prune_depth(src, DepthTarget(9, Saliency("loss")), _blocks(), tmp_path / "out", progress=False)
    with pytest.raises(PdcError, match="no Hugging Face checkpoint"):
        prune_depth(tmp_path / "missing", DepthTarget(2), _blocks(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
