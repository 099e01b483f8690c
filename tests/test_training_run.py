"""The run around the training step: the schedule's horizon against diffusers, independent
initial adapters, held-out scores against skimage and `lpips`, the logs, safe resumes and the
degradation settings."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from PIL import Image, ImageFilter
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_lpips import reference, save_backbone

from tsdsr_jax.conversion.lpips import plan_lpips
from tsdsr_jax.data.degrade import DegradeConfig
from tsdsr_jax.evaluation.grid import grid_score
from tsdsr_jax.io.tree import flatten, nest
from tsdsr_jax.training import command, loop, optim, progress, run_config, stages, validation
from tsdsr_jax.training.run_config import ConfigError

DATA = Path(__file__).parent / "data"
TINY = ["--config", "configs/tiny.py"]


# --------------------------------------------------------------------------- the schedule


def diffusers_rates(name: str, warmup: int, total: int, steps: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-6)
    scheduler = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    return rates


def test_the_horizon_follows_total_steps():
    config = run_config.read([*TINY[:1], "configs/tsd.py", "--config.total_steps=10000"])
    student = optim.for_run(config.optim_student, config.total_steps)
    assert student.total_steps == 10_000
    want = diffusers_rates("cosine", 3000, 10_000, 10_050)
    got = np.asarray(jax.vmap(optim.lr_schedule(student))(jnp.arange(10_050)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    # a horizon of its own stays, and leaves the run's length alone
    config = run_config.read(["--config", "configs/tsd.py", "--config.total_steps=10000",
                              "--config.optim_fake_score.total_steps=4000"])
    assert config.total_steps == 10_000 and config.optim_student.total_steps is None
    assert optim.for_run(config.optim_fake_score, config.total_steps).total_steps == 4000


def test_teacher_schedule_follows_total_steps():
    config = run_config.read(["--config", "configs/teacher.py", "--config.total_steps=700"])
    teacher = optim.for_run(config.optim_teacher, config.total_steps)
    want = diffusers_rates("constant_with_warmup", 500, 700, 700)
    got = [float(optim.lr_schedule(teacher)(s)) * 5e-6 / teacher.learning_rate
           for s in range(700)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --------------------------------------------------------------------------- initial state


def test_every_adapter_starts_from_its_own_key():
    config = run_config.read(TINY)
    state = stages.make_stage(config, loop.load_model(config)).state
    adapters = {"student": state.student.transformer, "student_vae": state.student.vae,
                "fake_score": state.fake_score}
    firsts = {name: np.asarray(next(v for k, v in sorted(flatten(a).items())
                                    if k.endswith("lora_A"))).ravel()[:8]
              for name, a in adapters.items()}
    names = list(firsts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(firsts[a], firsts[b]), (a, b)


# --------------------------------------------------------------------------- held-out scores


def test_held_out_scores_match_skimage_and_lpips(tmp_path):
    hr, sr = [], []
    for name in ("astronaut_256.png", "coffee.png"):
        photo = Image.open(DATA / name).convert("RGB").crop((0, 0, 128, 128))
        hr.append(np.asarray(photo))
        sr.append(np.asarray(photo.filter(ImageFilter.GaussianBlur(1.2))))
    hr, sr = np.stack(hr), np.stack(sr)
    backbone = save_backbone(tmp_path, "alex")
    planned, _ = plan_lpips(backbone)
    params = nest({k: jnp.asarray(planned.fetch(k)) for k in planned.specs})
    got = validation.scores(sr, hr, params)

    luma = [(rgb2ycbcr(x)[..., 0] / 255, rgb2ycbcr(y)[..., 0] / 255) for x, y in zip(sr, hr)]
    psnr = np.mean([peak_signal_noise_ratio(y, x, data_range=1) for x, y in luma])
    ssim = np.mean([structural_similarity(np.round(x * 255), np.round(y * 255),
                                          gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255)
                    for x, y in luma])
    model = reference(backbone, "alex")
    nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2) / 255, dtype=torch.float32)  # noqa
    with torch.no_grad():
        lpips = model(nchw(sr), nchw(hr), normalize=True).mean().item()
    assert got["val/psnr"] == pytest.approx(psnr, rel=1e-6)
    assert got["val/ssim"] == pytest.approx(ssim, rel=1e-4)
    assert got["val/lpips"] == pytest.approx(lpips, rel=1e-4)
    assert got["val/grid"] == pytest.approx(np.mean([grid_score(x) for x in sr]))


def test_held_out_scores_of_small_crops_leave_the_grid_out():
    photo = np.asarray(Image.open(DATA / "coffee.png").convert("RGB"))[None, :32, :48]
    assert set(validation.scores(photo, photo, None)) == {"val/psnr", "val/ssim"}


def test_held_out_samples_are_fixed():
    config = run_config.read(TINY)
    spec = stages.sample_spec(config, loop.load_model(config))
    roots = (str(DATA / "train"),)
    first = validation.held_out(roots, 2, spec, DegradeConfig(), seed=3)
    again = validation.held_out(roots, 2, spec, DegradeConfig(), seed=3)
    other = validation.held_out(roots, 2, spec, DegradeConfig(), seed=4)
    assert first["lr"].shape == (2, 64, 64, 3) == first["hr"].shape
    np.testing.assert_array_equal(first["lr"], again["lr"])
    np.testing.assert_array_equal(first["hr"], other["hr"])
    assert not np.array_equal(first["lr"], other["lr"])


# --------------------------------------------------------------------------- a run


def test_the_clock_times_completed_steps_without_pauses(monkeypatch):
    now = iter([100.0, 104.0, 107.0, 110.0, 112.0])  # start, pause in and out, then two calls
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(now))
    clock = progress.Clock(total_steps=12, batch_size=4)
    assert clock.completed(2) == {}  # the first step compiled: it only starts the clock
    with clock.pause():  # 3 s of validation
        pass
    assert clock.completed(4) == {"step_time_s": 3.5, "images_per_s": 4 / 3.5,
                                  "eta_s": 8 * 3.5}
    assert clock.completed(6) == {"step_time_s": 1.0, "images_per_s": 4.0,
                                  "eta_s": 6 * (7 + 2) / 4}
    assert progress.duration(90061) == "1d 01:01:01"


def train(workdir: Path, *overrides: str) -> int:
    return command.main([*TINY, f"--config.workdir={workdir}", "--config.total_steps=4",
                         "--config.log_every=2", "--config.validate_every=4",
                         "--config.checkpoint_every=4", "--config.data.num_workers=0",
                         *overrides])


def logged(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_pace_rates_scores_and_resumes_safely(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train(workdir, f"--config.validation.roots={DATA / 'train'}",
                 "--config.validation.num_images=2", "--config.validation.panels=1") == 0
    err = capsys.readouterr().err
    assert "step 4/4  loss" in err and " s/step  " in err and "\r" not in err  # not a terminal
    rows = logged(workdir)
    last = rows[-1]
    for key in ("lr_student", "lr_fake_score", "step_time_s", "images_per_s", "eta_s",
                "skipped_student", "skipped_fake", "zeroed_dasm",
                "val/psnr", "val/ssim", "val/lpips", "val/grid"):
        assert key in last, key
    assert last["step"] == 4 and last["eta_s"] == 0
    assert last["images_per_s"] == pytest.approx(1 / last["step_time_s"])
    # the rate of the next update: warm-up of 10 steps to 1e-3 over a horizon of 4 steps
    assert rows[0]["lr_student"] == pytest.approx(1e-3 * 2 / 10)
    panels = np.asarray(Image.open(workdir / "validation" / "step_0000004.png"))
    assert panels.shape == (64, 3 * 64, 3)

    # a changed learning rate resumes, and is said; the old config is kept
    assert train(workdir, "--config.total_steps=6",
                 "--config.optim_student.learning_rate=0.002") == 0
    out = capsys.readouterr().out
    assert "resume: optim_student.learning_rate: 0.001 -> 0.002" in out
    assert "resume: total_steps: 4 -> 6" in out
    assert json.loads((workdir / "config.before_4.json").read_text())["total_steps"] == 4
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 6

    # a changed rank cannot resume: one line, exit 2, nothing written
    before = sorted(p.name for p in workdir.iterdir())
    assert train(workdir, "--config.total_steps=8", "--config.student_rank=8") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {workdir}: cannot resume step 6 with student_rank: 4 -> 8 (the "
                   "checkpoint was trained with the old value): keep it, or give another "
                   "--config.workdir")
    assert sorted(p.name for p in workdir.iterdir()) == before


# --------------------------------------------------------------------------- the config


def test_degradation_settings_reach_the_config():
    config = run_config.read([*TINY, "--config.data.degradation.usm_sharpen=True",
                              "--config.data.degradation.stage2.jpeg_range=(60, 90)"])
    section = run_config.section(config, "data").degradation
    assert section == DegradeConfig(usm_sharpen=True, stage2=DegradeConfig().stage2.__class__(
        **{**DegradeConfig().stage2.__dict__, "jpeg_range": (60, 90)}))
    for flag, message in (
            ("--config.data.degradation.stage1.jpeg_range=(90, 30)",
             "config.data.degradation.stage1.jpeg_range=(90, 30): must be (low, high) with "
             "low <= high within [1, 100]"),
            ("--config.data.degradation.kernel1.probs=(0.5, 0.5, 0, 0, 0, 0.5)",
             "config.data.degradation.kernel1.probs=(0.5, 0.5, 0, 0, 0, 0.5): must be "
             "probabilities in [0, 1] that sum to 1"),
            ("--config.data.degradation.final_sinc_prob=2.0",
             "config.data.degradation.final_sinc_prob=2.0: must be >= 0 and <= 1")):
        with pytest.raises(ConfigError) as e:
            run_config.read([*TINY, flag])
        assert str(e.value) == message


def test_validation_roots_are_checked():
    with pytest.raises(ConfigError, match="validation.num_images=0: must be >= 1"):
        run_config.read([*TINY, "--config.validation.num_images=0"])
    config = run_config.read([*TINY, "--config.validation.roots=a,b"])
    assert tuple(config.validation.roots) == ("a", "b")
