"""A tiny random model on the bundled photos: the whole training loop on a laptop CPU in minutes.

    tsdsr-train --config configs/tiny.py --config.workdir=workdirs/tiny
    tsdsr-train --config configs/tiny.py:teacher --config.workdir=workdirs/tiny-teacher

The first trains TSD-SR (configs/tsd.py), the second the teacher LoRA (configs/teacher.py).
Nothing here is a real model; it checks the machinery (losses fall, checkpoints resume exactly).
"""

import ml_collections

from configs import teacher, tsd


def get_config(stage: str = "tsd") -> ml_collections.ConfigDict:
    if stage not in ("tsd", "teacher"):
        raise ValueError(f"configs/tiny.py:{stage}: 'tsd' or 'teacher'")
    c = tsd.get_config() if stage == "tsd" else teacher.get_config()
    c.model = "tiny"                  # the built-in tiny random model (with a random LPIPS)
    c.workdir = f"workdirs/tiny-{stage}"
    c.seed = 0
    c.total_steps = 120
    c.batch_size = 1
    c.precision = "fp32"
    c.remat_policy = "none"
    c.attention_impl = None           # JAX's default on the CPU (cuDNN needs a GPU)
    c.data.roots = ("tests/data/train",)
    c.data.resolution = 64
    c.data.num_workers = 0
    c.log_every = 5
    c.validate_every = 60
    c.checkpoint_every = 60
    if stage == "teacher":
        c.teacher_rank = 4
        c.optim_teacher.learning_rate = 1e-3
        c.optim_teacher.warmup_steps = 10
        c.sample.num_steps = 4
        return c
    c.teacher = "sd3"                 # it has no teacher LoRA: its base teaches
    c.student_rank = c.student_vae_rank = c.fake_score_rank = 4
    c.tsd.dasm_steps = 2
    for optim in (c.optim_student, c.optim_fake_score):
        optim.warmup_steps = 10
    c.optim_student.learning_rate = 1e-3
    c.optim_fake_score.learning_rate = 1e-3
    c.data.degrade = True
    return c
