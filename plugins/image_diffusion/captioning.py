"""CIDEr for image -> caption generation, through pycocoevalcap's scorer.

The official COCO caption pipeline first runs Stanford's PTBTokenizer (a Java program) over
references and hypotheses. Java is not available here, so ``tokenize_for_cider`` replaces it with a
small pure-Python rule: lowercase, drop punctuation, keep apostrophes inside words. The PTB tokenizer
also drops punctuation but splits clitics ("dog's" -> "dog 's") and keeps hyphenated words whole,
which we do not; our CIDEr is therefore close to, but not identical with, the official COCO numbers.
"""

from __future__ import annotations

import hashlib
import re

import torch

from mot_core.errors import MotError

# A word: letters/digits (any script), optionally joined by inner apostrophes ("don't", "o'clock").
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize_for_cider(text: str) -> str:
    """Lowercase, drop punctuation (keep letters, digits, apostrophes inside words), collapse whitespace.

    Our replacement of the COCO PTBTokenizer (which needs Java); see the module docstring for how
    the two differ. Examples: "A Dog's  toy!" -> "a dog's toy"; "black-and-white" -> "black and white"."""
    # Typographic apostrophes count as apostrophes: captions pasted from the web often carry them.
    return " ".join(_WORD.findall(text.lower().replace("\u2019", "'")))


def cider_score(references: list[list[str]], hypotheses: list[str]) -> float:
    """CIDEr-D of each hypothesis against its references through pycocoevalcap's Cider scorer, averaged.

    references: N lists of reference captions; hypotheses: N captions (raw text, tokenized here).
    pycocoevalcap's ``Cider`` is the CIDEr-D variant the COCO server reports (n = 1..4, Gaussian length
    penalty sigma 6, clipped counts, x10 inside). The value is returned x1, as the scorer returns it
    (a good COCO model is around 1.2); papers print it x100 (e.g. "CIDEr 120")."""
    if not references or not hypotheses:
        raise MotError("CIDEr needs at least one hypothesis with references (got an empty list)")
    if len(references) != len(hypotheses):
        raise MotError(f"CIDEr got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    from pycocoevalcap.cider.cider import Cider

    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (refs, hypothesis) in enumerate(zip(references, hypotheses)):
        tokenized = [t for t in (tokenize_for_cider(r) for r in refs) if t]
        if not tokenized:
            raise MotError(f"CIDEr: item {i} has no non-empty reference caption")
        gts[i], res[i] = tokenized, [tokenize_for_cider(hypothesis)]
    # CIDEr's IDF is computed over the reference lists passed in here, not over a fixed corpus: the
    # same hypothesis scores differently in another evaluation set, so compare runs on the same set.
    # With a single item every n-gram has IDF log(1) = 0 and the score is 0.
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def references_by_image(images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[list[str]]]:
    """Group identical images (same bytes) with all their distinct non-empty captions -> (M,3,H,W), M reference lists.

    images: (N, 3, H, W); captions: N strings. Groups keep the order of first appearance, and captions
    within a group too. Images none of whose copies has a non-empty caption are left out: they cannot
    be references."""
    if len(images) != len(captions):
        raise MotError(f"references_by_image got {len(images)} images but {len(captions)} captions")
    rows: dict[bytes, int] = {}
    firsts: list[int] = []
    groups: list[list[str]] = []
    for i, caption in enumerate(captions):
        # A digest, not the raw bytes, as the key: thousands of images would otherwise be copied into the dict.
        # Raw bytes through a uint8 view: numpy has no bfloat16, and equal bytes is what "identical" means.
        raw = images[i].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        key = hashlib.blake2b(raw, digest_size=16).digest()
        if key not in rows:
            rows[key] = len(firsts)
            firsts.append(i)
            groups.append([])
        caption = caption.strip()
        if caption and caption not in groups[rows[key]]:
            groups[rows[key]].append(caption)
    kept = [g for g in range(len(groups)) if groups[g]]
    index = torch.tensor([firsts[g] for g in kept], dtype=torch.long)
    return images[index.to(images.device)], [groups[g] for g in kept]
