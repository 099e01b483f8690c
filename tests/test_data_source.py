"""The grain training pipeline over the official layout: batches, sharding, resuming, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tsdsr_jax.data.batches import DataConfig, ProcessBatches, train_batches
from tsdsr_jax.data.degrade import DegradeConfig
from tsdsr_jax.data.layout import DataError, scan
from tsdsr_jax.data.source import SampleSpec, load_sample
from tsdsr_jax.io.safetensors import save_arrays

SPEC = SampleSpec(resolution=32, prompt_shape=(5, 8), pooled_dim=6, latent_channels=4)


def make_root(root: Path, stems: range, official: bool) -> Path:
    """A dataset root whose sample ``n`` carries ``n`` in every file: HR pixels 2n, LR pixels
    2n+1, embeddings and latents n; in the official .pt layout or in ours."""
    for folder in ("gt", "lr_bicubic", "prompt_txt", "prompt_embeds", "pool_embeds", "latent_hr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    side = SPEC.resolution
    for n in stems:
        stem = f"{n:07d}"
        for folder, value in (("gt", 2 * n), ("lr_bicubic", 2 * n + 1)):
            image = Image.fromarray(np.full((side, side, 3), value, np.uint8))
            image.save(root / folder / f"{stem}.png")
        (root / "prompt_txt" / f"{stem}.txt").write_text(f"photo {n}")
        prompt = np.full((1, *SPEC.prompt_shape), n, np.float32)
        pooled = np.full((1, SPEC.pooled_dim), n, np.float32)
        latent = np.full((1, SPEC.latent_channels, 4, 4), n, np.float32)  # official NCHW
        if official:
            torch.save(torch.from_numpy(prompt), root / "prompt_embeds" / f"{stem}.pt")
            torch.save(torch.from_numpy(pooled), root / "pool_embeds" / f"{stem}.pt")
            torch.save(torch.from_numpy(latent), root / "latent_hr" / f"{stem}.pt")
        else:
            save_arrays(root / "prompt_embeds" / f"{stem}.safetensors",
                        {"prompt_embeds": prompt[0]})
            np.save(root / "pool_embeds" / f"{stem}.npy", pooled[0])
            save_arrays(root / "latent_hr" / f"{stem}.safetensors",
                        {"latent": latent[0].transpose(1, 2, 0)})
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("data")
    return (make_root(base / "a", range(6), official=True),
            make_root(base / "b", range(6, 12), official=False))


def config(roots, **kw) -> DataConfig:
    return DataConfig(roots=tuple(roots), batch_size=kw.pop("batch_size", 2), spec=SPEC,
                      shard_index=kw.pop("shard_index", 0), shard_count=kw.pop("shard_count", 1),
                      **kw)


def ids(batch) -> list[int]:
    """The sample numbers of a batch, checked to agree across every array."""
    n = batch["prompt_embeds"][:, 0, 0].astype(int)
    hr = np.rint((batch["hr"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    lr = np.rint((batch["lr"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    np.testing.assert_array_equal(hr, 2 * n)
    np.testing.assert_array_equal(lr, 2 * n + 1)
    np.testing.assert_array_equal(batch["pooled_prompt_embeds"][:, 0], n)
    np.testing.assert_array_equal(batch["latent_hr"][:, 0, 0, 0], n)
    return n.tolist()


def test_batches_mix_roots_and_formats(roots):
    batches = list(train_batches(config(roots, num_epochs=1)))
    assert len(batches) == 6
    b = batches[0]
    assert b["lr"].shape == b["hr"].shape == (2, 32, 32, 3)
    assert b["prompt_embeds"].shape == (2, 5, 8) and b["pooled_prompt_embeds"].shape == (2, 6)
    assert b["latent_hr"].shape == (2, 4, 4, 4)
    assert all(v.dtype == np.float32 for v in b.values())
    seen = [i for b in batches for i in ids(b)]
    assert sorted(seen) == list(range(12)) and seen != list(range(12))  # all, shuffled


def test_epochs_reshuffle_and_seed_determines_order(roots):
    two = [i for b in train_batches(config(roots, num_epochs=2)) for i in ids(b)]
    assert sorted(two[:12]) == sorted(two[12:]) == list(range(12)) and two[:12] != two[12:]
    again = [i for b in train_batches(config(roots, num_epochs=2)) for i in ids(b)]
    other = [i for b in train_batches(config(roots, num_epochs=2, seed=1)) for i in ids(b)]
    assert again == two and other != two


def test_shards_are_disjoint_halves(roots):
    halves = [[i for b in train_batches(config(roots, num_epochs=1, shard_index=k, shard_count=2))
               for i in ids(b)] for k in range(2)]
    assert len(halves[0]) == len(halves[1]) == 6
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == list(range(12))


def test_global_batch_is_the_same_for_any_number_of_processes(roots):
    """Four data shards read by one, two or four processes give the same global batches, and
    one process's position resumes any split of them."""
    cfg = config(roots, batch_size=4, degradation=DegradeConfig())

    def global_batches(processes, steps, state=None):
        its = [ProcessBatches(cfg, 4, k, processes) for k in range(processes)]
        for it in its:
            if state is not None:
                it.set_state(state)
        batches = []
        for _ in range(steps):
            parts = [next(it) for it in its]
            batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        return batches, its[0].get_state()

    one, state = global_batches(1, 3)
    four, _ = global_batches(4, 3)
    for a, b in zip(one, four):
        for key in a:  # the same samples, and the same degradation of them
            np.testing.assert_array_equal(a[key], b[key])
    assert len({tuple(b["prompt_embeds"][:, 0, 0]) for b in one}) == 3
    more, _ = global_batches(1, 2, state)
    resumed, _ = global_batches(2, 2, state)
    for a, b in zip(more, resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="3 data shards"):
        ProcessBatches(cfg, 3, 0, 2)


@pytest.mark.parametrize("workers,degradation", [(0, DegradeConfig()), (1, None)])
def test_resumed_iterator_continues_exactly(roots, workers, degradation):
    cfg = config(roots, num_workers=workers, degradation=degradation)
    it = iter(train_batches(cfg))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(8)]  # crosses an epoch boundary
    resumed = iter(train_batches(cfg))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    for i in (it, resumed):
        if hasattr(i, "close"):
            i.close()


def test_degraded_lr_comes_from_hr(roots):
    batch = next(iter(train_batches(config(roots, degradation=DegradeConfig(), latents=True))))
    lr, hr = batch["lr"], batch["hr"]
    assert lr.shape == hr.shape and -1 <= lr.min() and lr.max() <= 1
    # a flat HR degrades to about the same flat value (plus noise, clipped at black)
    np.testing.assert_allclose(lr.mean(axis=(1, 2, 3)), hr.mean(axis=(1, 2, 3)), atol=0.25)


def test_missing_partner_is_named_or_skipped(tmp_path, caplog):
    root = make_root(tmp_path / "r", range(4), official=False)
    (root / "gt" / "0000002.png").unlink()
    (root / "pool_embeds" / "0000003.npy").unlink()
    with pytest.raises(DataError) as e:
        scan([root], read_lr=True)
    assert "lr_bicubic/0000002.png: no partner gt/0000002.*" in str(e.value)
    assert "pool_embeds/0000003.*" in str(e.value)
    records, problems = scan([root], read_lr=True, skip_invalid=True)
    assert [Path(r.hr).stem for r in records] == ["0000000", "0000001"] and len(problems) == 2
    assert "skipping 2 incomplete samples" in caplog.text and "0000003" in caplog.text


def test_latents_in_some_roots_only_is_an_error(tmp_path):
    a = make_root(tmp_path / "a", range(2), official=False)
    b = make_root(tmp_path / "b", range(2, 4), official=False)
    for f in (b / "latent_hr").iterdir():
        f.unlink()
    (b / "latent_hr").rmdir()
    with pytest.raises(DataError, match=f"{b}: no latent_hr/"):
        scan([a, b], read_lr=True)
    records, _ = scan([a, b], read_lr=True, latents=False)
    assert len(records) == 4 and all(r.latent_hr is None for r in records)


def test_corrupt_files_are_named_or_skipped(tmp_path):
    root = make_root(tmp_path / "r", range(4), official=False)
    (root / "lr_bicubic" / "0000001.png").write_bytes(b"not a png")
    save_arrays(root / "prompt_embeds" / "0000002.safetensors", {"x": np.zeros((4, 8), np.float32)})
    (root / "latent_hr" / "0000003.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(DataError, match="000000[123]"):  # whichever comes first
        list(train_batches(config([root], num_epochs=1, batch_size=1)))
    got = [i for b in train_batches(config([root], num_epochs=1, batch_size=1, skip_invalid=True))
           for i in ids(b)]
    assert got == [0]
    for bad, message in ((1, "cannot read image"), (2, r"shape \(4, 8\), expected \(5, 8\)"),
                         (3, "not a readable safetensors file")):
        records, _ = scan([root], read_lr=True)
        with pytest.raises(DataError, match=f"{bad:07d}.*{message}"):
            load_sample(records[bad], 0, SPEC, None, (0,))
