"""A tiny random model on the bundled photos: the whole training loop on a laptop CPU in minutes.

    python train.py --config configs/tiny.py --config.workdir=workdirs/tiny

Nothing here is a real super-resolution model; it checks the machinery (losses fall, checkpoints
resume exactly).
"""

import ml_collections

from configs import tsd


def get_config() -> ml_collections.ConfigDict:
    c = tsd.get_config()
    c.model = "tiny"                  # the built-in tiny random model (with a random LPIPS)
    c.teacher = "sd3"                 # it has no teacher LoRA: its base teaches
    c.workdir = "workdirs/tiny"
    c.seed = 0
    c.total_steps = 120
    c.batch_size = 1
    c.precision = "fp32"
    c.remat_policy = "none"
    c.attention_impl = None           # JAX's default on the CPU (cuDNN needs a GPU)
    c.student_rank = c.student_vae_rank = c.fake_score_rank = 4
    c.tsd.dasm_steps = 2
    for optim in (c.optim_student, c.optim_fake_score):
        optim.warmup_steps = 10
        optim.total_steps = 120
    c.optim_student.learning_rate = 1e-3
    c.optim_fake_score.learning_rate = 1e-3
    c.data.roots = ("tests/data/train",)
    c.data.resolution = 64
    c.data.degrade = True
    c.data.num_workers = 0
    c.log_every = 5
    c.validate_every = 60
    c.checkpoint_every = 60
    return c
