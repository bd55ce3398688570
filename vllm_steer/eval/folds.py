"""K-fold evaluation on TruthfulQA: a question's fold comes from its text, so the same question is in
the same fold in ``mc_task.json`` and in ``TruthfulQA.csv`` (the two files list the questions in
different orders). The pack that scores fold k is fitted on the other folds' questions only and is
named ``{name}.fold{k}``; an evaluation job with ``folds=K`` sends each question to its fold's pack.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vllm_steer.errors import SteeringError


def fold_of(question: str, folds: int, seed: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}\x00{question.strip()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def fold_pack_name(name: str, fold: int) -> str:
    return f"{name}.fold{fold}"


def write_training_split(mc_task: str | Path, fold: int, folds: int, seed: int, out: str | Path) -> int:
    """Write ``mc_task.json``'s questions that are *not* in ``fold`` to ``out``; returns how many."""
    if not 0 <= fold < folds:
        raise SteeringError(f"fold must be in [0, {folds}), got {fold}", field="fold")
    entries = json.loads(Path(mc_task).read_text())
    kept = [e for e in entries if fold_of(e["question"], folds, seed) != fold]
    Path(out).write_text(json.dumps(kept))
    return len(kept)


def fit_fold_packs(model: str, mc_task: str | Path, folds: int, seed: int, out_dir: str | Path, options,
                   llm=None) -> list[Path]:
    """One pack per fold, each fitted (``fit.pipeline``) on the other folds' questions; ``options`` is
    a ``FitOptions`` whose ``name`` becomes ``{name}.fold{k}``. Existing packs are kept (resume).
    ``llm``: an existing capture engine to fit with (otherwise each fit starts one)."""
    from dataclasses import replace

    from vllm_steer.fit.pipeline import fit_steer_pack

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(folds):
        name = fold_pack_name(options.name, k)
        path = out_dir / f"{name}.safetensors"
        if not path.exists():
            data = out_dir / f"{name}.train.json"
            write_training_split(mc_task, k, folds, seed, data)
            fit_steer_pack(model, data, path, replace(options, name=name), llm=llm)
        paths.append(path)
    return paths
