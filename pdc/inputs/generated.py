"""Text a model samples, cached like the teacher logits: the corpus of `generate(...)` data.

`generated_corpus(cfg, model_dir, prompts)` returns a JSONL file of documents, each a prompt and
the model's sampled continuation, in `<cache>/generated/<key>/corpus.jsonl`. The key covers the
model's content hashes, the prompts actually used (their token ids), every sampling setting and
the format, so a changed model, prompt corpus or setting is a new corpus and an equal one is
generated once for every spec and stage.

How: the first `ceil(tokens / length)` non-empty documents of the prompt corpus, each cut to its
first `prompt_tokens` tokens, are the prompts; sample i starts from prompt i mod P. Samples run
`batch` at a time (left-padded), each batch a *part* drawn from its own seed (`seed`, part
number): the part's bits do not depend on what ran before it, so a killed generation resumes at
the first missing part and writes what one uninterrupted run writes. A sample ends at EOS or
after `length` new tokens; parts are added until `tokens` new tokens are written. A part is
written whole to a temporary name and renamed, and `corpus.jsonl` (the parts in order) only when
the last part is there: nothing half-written is ever read. The model runs in fp32 (the teacher
logits' CPU dtype) and with plain sampling at `temperature` (no top-k/top-p: the model's own
distribution, the one distillation matches).

The text is decoded and tokenized again by the shard pipeline like any corpus; a decode/encode
round trip can merge a few tokens differently from the sampled ids, which changes the tokens,
not the text.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pdc.errors import PdcError
from pdc.files import exclusive_lock, sha256_json, write_json, write_text
from pdc.inputs.cache import cache_root
from pdc.inputs.models import load_causal_lm
from pdc.inputs.verify import content_hashes, load_tokenizer
from pdc.lang.settings import GenerateConfig

FORMAT = "generated-v1"  # the layout and sampling rule above: part of every key
CORPUS, META, PART = "corpus.jsonl", "generated.json", "part-{:05d}.jsonl"


def prompt_ids(documents, tokenizer, cfg: GenerateConfig) -> list[list[int]]:
    """The prompts: the first `prompt_tokens` tokens of the first non-empty documents, as many as
    `tokens / length` samples need (fewer when the corpus has fewer)."""
    wanted = math.ceil(cfg.tokens / cfg.length)
    out = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False).input_ids[: cfg.prompt_tokens]
        if ids:
            out.append(ids)
            if len(out) == wanted:
                break
    return out


def corpus_key(model_hashes: dict, prompts: list[list[int]], cfg: GenerateConfig) -> str:
    settings = [cfg.tokens, cfg.length, cfg.prompt_tokens, float(cfg.temperature), cfg.seed, cfg.batch]
    return sha256_json([FORMAT, model_hashes, sha256_json(prompts), settings])[:24]


class _Steps:
    """A `generate` streamer that counts the rows still sampling at each step (the progress bar)."""

    def __init__(self, on_tokens, eos: int):
        self.on_tokens, self.eos, self.alive, self.first = on_tokens, eos, None, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate hands over the prompts first
            self.first = False
            return
        self.alive = torch.ones(value.shape[0], dtype=torch.bool) if self.alive is None else self.alive
        self.on_tokens(int(self.alive.sum()))
        self.alive &= value.reshape(-1) != self.eos

    def end(self) -> None:
        pass


@torch.no_grad()
def sample_part(model, tokenizer, prompts: list[list[int]], cfg: GenerateConfig, part: int,
                on_tokens=lambda n: None) -> list[dict]:
    """Part `part`: samples part*batch ... as documents {"text", "new_tokens"}; `on_tokens(n)` is
    called after each step with the number of tokens it sampled."""
    first = part * cfg.batch
    batch = [prompts[(first + i) % len(prompts)] for i in range(cfg.batch)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.random.fork_rng(devices=[]):  # the part's own seed; the caller's generator untouched
        torch.manual_seed(cfg.seed * 1_000_003 + part)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                             top_k=0, top_p=1.0, max_new_tokens=cfg.length, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, streamer=_Steps(on_tokens, tokenizer.eos_token_id))
    docs = []
    for prompt, row in zip(batch, out[:, width:].tolist()):
        new = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        docs.append({"text": tokenizer.decode(prompt + new, skip_special_tokens=True), "new_tokens": len(new)})
    return docs


def _read_part(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def generated_corpus(cfg: GenerateConfig, model_dir: Path, documents, stage: str | None = None,
                     progress: bool = False, label: str = "generate") -> Path:
    """The JSONL corpus `cfg` samples from the model in `model_dir` with prompts from `documents`
    (an iterable of texts), generated now unless the cache holds it."""
    tokenizer = load_tokenizer(Path(model_dir), stage=stage)
    prompts = prompt_ids(documents, tokenizer, cfg)
    if not prompts:
        raise PdcError("generate(...): the prompt corpus has no text", stage)
    hashes = content_hashes(Path(model_dir), stage)
    directory = cache_root() / "generated" / corpus_key(hashes, prompts, cfg)
    if (directory / CORPUS).exists():
        return directory / CORPUS
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".generate.lock", f"another pdc process is generating into {directory}"):
        if (directory / CORPUS).exists():
            return directory / CORPUS
        from tqdm import tqdm

        model = load_causal_lm(Path(model_dir), stage or "generate")
        parts, written, t0 = [], 0, time.perf_counter()
        with tqdm(total=cfg.tokens, unit="tok", desc=label, disable=not progress) as bar:
            while written < cfg.tokens:
                path = directory / PART.format(len(parts))
                if path.exists():  # a part of an interrupted generation: whole, as it was renamed
                    docs = _read_part(path)
                else:
                    docs = sample_part(model, tokenizer, prompts, cfg, len(parts),
                                       lambda n: bar.update(min(n, cfg.tokens - bar.n)))
                    write_text(path, "".join(json.dumps(d) + "\n" for d in docs))
                parts.append(path)
                written += sum(d["new_tokens"] for d in docs)
                bar.n = min(written, cfg.tokens)  # the exact count (the steps count EOS too)
                bar.refresh()
        seconds = time.perf_counter() - t0
        write_json(directory / META, {
            "format": FORMAT, "model": hashes, "settings": {k: getattr(cfg, k) for k in (
                "tokens", "length", "prompt_tokens", "temperature", "seed", "batch")},
            "prompts": len(prompts), "samples": len(parts) * cfg.batch, "parts": len(parts),
            "new_tokens": written, "seconds": round(seconds, 1)})
        write_text(directory / CORPUS, "".join(p.read_text("utf-8") for p in parts))
    return directory / CORPUS
