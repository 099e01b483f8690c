"""The official training layout: which files make one sample, found and checked by name.

::

    ROOT/
      gt/<stem>.png               HR image, 512² (SeeSR's USM-sharpened crop)
      lr_bicubic/<stem>.png       degraded LR, bicubic-upsampled back to 512²
      prompt_txt/<stem>.txt       caption
      prompt_embeds/<stem>.*      (333, 4096) caption embeddings
      pool_embeds/<stem>.*        (2048,) pooled caption embeddings
      latent_hr/<stem>.*          E(x_H)·s, (64, 64, 16) ours or (1, 16, 64, 64) official

Tensors are ``.safetensors`` (ours, one tensor), ``.npy``, or the official ``.pt``; when a stem
has several, ours wins. The official loader lists ``lr_bicubic/`` and derives every other name
from it; so do we (``gt/`` when the LR is made on the fly).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

GT, LR, PROMPT_TXT = "gt", "lr_bicubic", "prompt_txt"
PROMPT_EMBEDS, POOL_EMBEDS, LATENT_HR = "prompt_embeds", "pool_embeds", "latent_hr"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TENSOR_EXTENSIONS = (".safetensors", ".npy", ".pt")  # in order of preference


class DataError(ValueError):
    """A dataset that cannot be used as it is; the message names every offending file."""


@dataclasses.dataclass(frozen=True)
class Record:
    """The files of one training sample (``lr`` is None when the LR is made on the fly)."""

    name: str
    hr: str
    lr: str | None
    prompt_embeds: str
    pooled_prompt_embeds: str
    latent_hr: str | None


def _stems(folder: Path, extensions: tuple[str, ...]) -> dict[str, str]:
    """``stem -> file name`` of the files in ``folder`` with one of ``extensions`` (earlier
    extensions win); empty when the folder does not exist."""
    if not folder.is_dir():
        return {}
    best: dict[str, tuple[int, str]] = {}
    rank = {ext: i for i, ext in enumerate(extensions)}
    for entry in os.scandir(folder):
        stem, ext = os.path.splitext(entry.name)
        r = rank.get(ext.lower())
        if r is not None and (stem not in best or r < best[stem][0]):
            best[stem] = (r, entry.name)
    found = {stem: name for stem, (_, name) in best.items()}
    return found


def _sort_key(stem: str) -> tuple:
    """Numeric order for numeric stems (as the official loader), then by name."""
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def scan(roots: list[str | os.PathLike], degrade: bool, latents: bool | None = None,
         skip_invalid: bool = False) -> tuple[list[Record], list[str]]:
    """The records of all ``roots`` in order, and the problems found (files without their
    partners). ``latents``: require ``latent_hr`` (None: use it when every root has it).
    Raises ``DataError`` listing the problems unless ``skip_invalid``, which drops those samples."""
    roots = [Path(r) for r in roots]
    if latents is None:
        latents = all((r / LATENT_HR).is_dir() for r in roots)
    records: list[Record] = []
    problems: list[str] = []
    for root in roots:
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        lead = GT if degrade else LR
        if not (root / lead).is_dir():
            raise DataError(f"{root}: has no {lead}/ folder")
        gt = _stems(root / GT, IMAGE_EXTENSIONS)
        lr = _stems(root / LR, IMAGE_EXTENSIONS)
        partners = {PROMPT_EMBEDS: _stems(root / PROMPT_EMBEDS, TENSOR_EXTENSIONS),
                    POOL_EMBEDS: _stems(root / POOL_EMBEDS, TENSOR_EXTENSIONS)}
        if latents:
            partners[LATENT_HR] = _stems(root / LATENT_HR, TENSOR_EXTENSIONS)
        if not degrade:
            partners[GT] = gt
        for stem in sorted(gt if degrade else lr, key=_sort_key):
            missing = [f"{folder}/{stem}.*" for folder, files in partners.items()
                       if stem not in files]
            if missing:
                lead_file = root / lead / (gt if degrade else lr)[stem]
                problems.append(f"{lead_file}: no partner {', '.join(missing)}")
                continue
            path = lambda folder, files: str(root / folder / files[stem])  # noqa: E731
            records.append(Record(
                name=f"{root}/{stem}", hr=path(GT, gt),
                lr=None if degrade else path(LR, lr),
                prompt_embeds=path(PROMPT_EMBEDS, partners[PROMPT_EMBEDS]),
                pooled_prompt_embeds=path(POOL_EMBEDS, partners[POOL_EMBEDS]),
                latent_hr=path(LATENT_HR, partners[LATENT_HR]) if latents else None))
    if problems and not skip_invalid:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} incomplete samples (skip them with skip_invalid):\n  "
                        f"{shown}{more}")
    if not records:
        raise DataError(f"no complete samples in {', '.join(map(str, roots))}")
    return records, problems
