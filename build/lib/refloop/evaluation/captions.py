"""BLEU-1..4, METEOR, ROUGE-L and CIDEr-D through pycocoevalcap (the captioning and REG papers' scorers).

Text is tokenized by pycocoevalcap's PTB tokenizer and METEOR 1.5 is scored, both Java programs
shipped with pycocoevalcap; the numbers then equal pycocoevalcap's. Without Java (or with
java=False) a fallback tokenizer is used instead - lower-case, punctuation removed, which is NOT the
PTB tokenizer ("3.5", "isn't", "!!!" split differently) - `tokenizer` in the output names it, and
METEOR is reported as None with `meteor_backend` saying why, never silently replaced by another
number.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_PUNCT = re.compile(r"[^\w\s]")
PTB_TOKENIZER = "ptb (java)"
FALLBACK_TOKENIZER = "fallback: lower-case, punctuation removed (not PTB)"


_HOLDING = threading.Lock()


@contextmanager
def child_stderr_held() -> Iterator[None]:
    """Child processes inherit file descriptor 2: while this holds, what they write there (the PTB
    tokenizer's Java prints a "tokenized N tokens" line on every call) goes to a temporary file,
    replayed on stderr only if the block fails, so a Java error is never lost. The whole process's
    descriptor 2 is redirected for the block (a second of tokenizing): one block at a time, and
    where descriptor 2 cannot be duplicated (closed) nothing is held."""
    with _HOLDING:
        if sys.stderr is not None:
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        try:
            with tempfile.TemporaryFile() as held:
                os.dup2(held.fileno(), 2)
                try:
                    yield
                except BaseException:
                    os.dup2(saved, 2)
                    held.seek(0)
                    if sys.stderr is not None:
                        sys.stderr.write(held.read().decode(errors="replace")[-4000:])
                    raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def simple_tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]], java: bool | None = None) -> dict:
    """Corpus-level scores of one prediction per id against its references, and per-id scores
    under "samples" (id -> BLEU-1..4, METEOR, ROUGE-L, CIDEr). `java`: None uses Java when it is
    on PATH; False forces the fallback tokenizer (and no METEOR)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not predictions:
        raise ValueError("no predictions to score")
    found = shutil.which("java") is not None
    use_java = found if java is None else java
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        with child_stderr_held():
            gts = tok.tokenize({k: [{"caption": r} for r in refs] for k, refs in references.items()})
            res = tok.tokenize({k: [{"caption": p}] for k, p in predictions.items()})
        res = {k: res[k] for k in gts}
    else:
        gts = {k: [simple_tokenize(r) for r in refs] for k, refs in references.items()}
        res = {k: [simple_tokenize(predictions[k])] for k in gts}
    ids = list(gts)  # pycocoevalcap's per-item scores follow this order
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    out: dict = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
    out |= {"ROUGE-L": float(rouge), "CIDEr": float(cider), "num": len(predictions)}
    samples = {
        k: {f"BLEU-{n + 1}": float(bleu_each[n][i]) for n in range(4)} | {"ROUGE-L": float(rouge_each[i]), "CIDEr": float(cider_each[i])}
        for i, k in enumerate(ids)
    }
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # a Java subprocess, ended when the object is collected
        score, meteor_each = meteor.compute_score(gts, res)
        del meteor
        out |= {"METEOR": float(score), "meteor_backend": "meteor-1.5 (java)", "tokenizer": PTB_TOKENIZER}
        for i, k in enumerate(ids):
            samples[k]["METEOR"] = float(meteor_each[i])
    else:
        why = "java=False was passed" if found else "java not found"
        out |= {"METEOR": None, "meteor_backend": f"unavailable: {why}", "tokenizer": f"{FALLBACK_TOKENIZER}; {why}"}
        for k in ids:
            samples[k]["METEOR"] = None
    return out | {"samples": samples}
