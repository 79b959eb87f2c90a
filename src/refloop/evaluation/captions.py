"""BLEU, ROUGE-L, CIDEr and METEOR through pycocoevalcap (the REG and captioning papers' scorers).

METEOR and the PTB tokenizer are Java programs shipped with pycocoevalcap. Without Java, text is
tokenized by a simple lower-case/punctuation rule and METEOR is reported as None with
`meteor_backend` saying why, never silently replaced by another number.
"""

from __future__ import annotations

import re
import shutil

_PUNCT = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]], java: bool | None = None) -> dict:
    """Corpus-level scores of one prediction per id against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not predictions:
        raise ValueError("no predictions to score")
    java = shutil.which("java") is not None if java is None else java
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": r} for r in refs] for k, refs in references.items()})
        res = tok.tokenize({k: [{"caption": p}] for k, p in predictions.items()})
    else:
        gts = {k: [simple_tokenize(r) for r in refs] for k, refs in references.items()}
        res = {k: [simple_tokenize(p)] for k, p in predictions.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {
        "BLEU-1": bleu[0],
        "BLEU-4": bleu[3],
        "ROUGE-L": rouge,
        "CIDEr": cider,
        "num": len(predictions),
        "tokenizer": "ptb (java)" if java else "simple (no java)",
    }
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # a Java subprocess, ended when the object is collected
        out["METEOR"], _ = meteor.compute_score(gts, res)
        del meteor
        out["meteor_backend"] = "meteor-1.5 (java)"
    else:
        out["METEOR"] = None
        out["meteor_backend"] = "unavailable: java not found"
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num" else v) for k, v in out.items()}
