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
import logging
import os
from pathlib import Path

from tsdsr_jax.io.images import EXTENSIONS as IMAGE_EXTENSIONS

GT, LR, PROMPT_TXT = "gt", "lr_bicubic", "prompt_txt"
PROMPT_EMBEDS, POOL_EMBEDS, LATENT_HR = "prompt_embeds", "pool_embeds", "latent_hr"
TENSOR_EXTENSIONS = (".safetensors", ".npy", ".pt")  # in order of preference

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset that cannot be used as it is; the message names every offending file."""


@dataclasses.dataclass(frozen=True)
class Record:
    """The files of one training sample (``lr`` is None when the LR is made on the fly or not
    needed)."""

    name: str
    hr: str
    lr: str | None
    prompt_embeds: str
    pooled_prompt_embeds: str
    latent_hr: str | None


def stems(folder: Path, extensions: tuple[str, ...]) -> dict[str, str]:
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
    return {stem: name for stem, (_, name) in best.items()}


def sort_key(stem: str) -> tuple:
    """Numeric order for numeric stems (as the official loader), then by name."""
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def scan(roots: list[str | os.PathLike], read_lr: bool, latents: bool | None = None,
         skip_invalid: bool = False) -> tuple[list[Record], list[str]]:
    """The records of all ``roots`` in order, and the problems found (files without their
    partners). ``read_lr``: samples are listed from ``lr_bicubic/`` (else from ``gt/``, for an
    LR made on the fly or none at all). ``latents``: require ``latent_hr`` (None: when the
    roots have it; all or none).
    Raises ``DataError`` listing the problems unless ``skip_invalid``, which drops those samples."""
    roots = [Path(r) for r in roots]
    if latents is None:
        having = [(r / LATENT_HR).is_dir() for r in roots]
        if any(having) and not all(having):
            lacking = ", ".join(str(r) for r, has in zip(roots, having) if not has)
            raise DataError(f"{lacking}: no {LATENT_HR}/ while other roots have one "
                            "(make them with tsdsr_jax.data.prepare, or set latents=False)")
        latents = all(having)
    records: list[Record] = []
    problems: list[str] = []
    for root in roots:
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        lead = LR if read_lr else GT
        if not (root / lead).is_dir():
            raise DataError(f"{root}: has no {lead}/ folder")
        files = {folder: stems(root / folder, IMAGE_EXTENSIONS) for folder in (GT, LR)}
        for folder in (PROMPT_EMBEDS, POOL_EMBEDS) + ((LATENT_HR,) if latents else ()):
            files[folder] = stems(root / folder, TENSOR_EXTENSIONS)
        partners = [f for f in files if f != lead and (read_lr or f != LR)]
        for stem in sorted(files[lead], key=sort_key):
            missing = [f"{folder}/{stem}.*" for folder in partners if stem not in files[folder]]
            if missing:
                problems.append(f"{root / lead / files[lead][stem]}: no partner "
                                f"{', '.join(missing)}")
                continue
            path = {folder: str(root / folder / names[stem])
                    for folder, names in files.items() if stem in names}
            records.append(Record(
                name=f"{root}/{stem}", hr=path[GT], lr=path[LR] if read_lr else None,
                prompt_embeds=path[PROMPT_EMBEDS], pooled_prompt_embeds=path[POOL_EMBEDS],
                latent_hr=path.get(LATENT_HR) if latents else None))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        if not skip_invalid:
            raise DataError(f"{len(problems)} incomplete samples (skip them with skip_invalid):"
                            f"\n  {shown}{more}")
        log.warning("skipping %d incomplete samples:\n  %s%s", len(problems), shown, more)
    if not records:
        raise DataError(f"no complete samples in {', '.join(map(str, roots))}"
                        + (f" ({problems[0]}{' …' if len(problems) > 1 else ''})"
                           if problems else ""))
    return records, problems
