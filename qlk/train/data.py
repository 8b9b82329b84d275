"""Data of ``qlk finetune``: JSONL records -> (input_ids, labels) examples -> padded batches.

Batches are a pure function of (seed, step): :class:`RunSampler` yields consecutive slices of
per-epoch permutations seeded by (seed, epoch), for the whole run at once. The Trainer therefore
sees one "epoch" of ``steps × batch_size`` indices; resuming skips the first ``step × batch_size``
of them, and under torchrun each process takes its share of every global batch (accelerate's
``BatchSamplerShard``), so one process and N processes read the same examples per step.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .._checks import UsageError
from ..lm import encode, prompt_text


def default_data_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "answer_reason.jsonl"


def load_records(path) -> list[dict]:
    """Records of a JSONL file: ``{"instruction", "response"}`` (optional ``"input"``) or ``{"text"}``.

    Raises :class:`UsageError` naming the file and line of the first bad record (bad UTF-8 too).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--data {p}: no such file")
    if p.is_dir():
        raise UsageError(f"--data {p}: is a directory; expected a JSONL file")
    records = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(
                    f"--data {p}, line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02X} at column {e.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--data {p}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise UsageError(f"--data {p}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
            if isinstance(rec.get("text"), str) and rec["text"].strip():
                records.append({"text": rec["text"]})
                continue
            ins, resp = rec.get("instruction", rec.get("prompt")), rec.get("response", rec.get("output"))
            if not (isinstance(ins, str) and isinstance(resp, str) and ins.strip() and resp.strip()):
                raise UsageError(
                    f"--data {p}, line {lineno}: expected non-empty string fields 'instruction' and 'response' "
                    f"(or 'text'); got keys {sorted(rec)}"
                )
            extra = rec.get("input")
            if isinstance(extra, str) and extra.strip():
                ins = f"{ins}\n\n{extra}"
            records.append({"instruction": ins, "response": resp})
    if not records:
        raise UsageError(f"--data {p}: no records (the file is empty or has only blank lines)")
    return records


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_records(records, eval_fraction: float) -> tuple[list, list]:
    """(train, eval): every k-th record goes to eval, k = round(1 / eval_fraction); none when 0."""
    if eval_fraction <= 0 or len(records) < 4:
        return list(records), []
    every = max(2, round(1 / eval_fraction))
    return ([r for i, r in enumerate(records) if i % every != every - 1],
            [r for i, r in enumerate(records) if i % every == every - 1])  # fmt: skip


def tokenize_records(records, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; prompt tokens get label -100, long texts are chunked."""
    eos = tokenizer.eos_token_id
    examples = []
    for rec in records:
        if "text" in rec:
            ids = encode(tokenizer, rec["text"]) + ([eos] if eos is not None else [])
            for i in range(0, len(ids), max_length):
                chunk = ids[i : i + max_length]
                if len(chunk) > 1:
                    examples.append((chunk, list(chunk)))
            continue
        p = encode(tokenizer, prompt_text(tokenizer, rec["instruction"]))
        r = encode(tokenizer, rec["response"]) + ([eos] if eos is not None else [])
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        if any(lab != -100 for lab in labels[1:]):
            examples.append((ids, labels))
    return examples


class Examples:
    """A map-style dataset of tokenized examples (what ``Trainer`` indexes)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels}


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of (0-based) step ``step``: consecutive slices of per-epoch permutations
    seeded by (seed, epoch), so any step's batch is known without replaying earlier ones."""
    import torch

    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


class RunSampler:
    """Every example index of the run, ``steps × batch_size`` of them, step by step (see module doc)."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int):
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self):
        for step in range(self.steps):
            yield from batch_indices(self.n, self.batch_size, step, self.seed)


class Collator:
    """Right-pads a list of examples into {input_ids, attention_mask, labels} (labels -100 on padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
