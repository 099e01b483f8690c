"""The teacher LoRA: SD3 fine-tuned on HR images with the flow-matching loss (paper §4.1).

    tsdsr-train --config configs/teacher.py --config.model=models/sd3 \
        --config.data.roots=/data/lsdir,/data/ffhq --config.workdir=workdirs/teacher

The model directory needs the null-prompt embeddings (`tsdsr-convert --sd3 … \
--null-embeddings …`). The run's checkpoints feed TSD-SR directly
(`--config.teacher=workdirs/teacher/checkpoints` with configs/tsd.py), and
`tsdsr-export --checkpoint workdirs/teacher/checkpoints --out DIR` writes the
official `teacher.safetensors`. The authors released their teacher LoRA but not how they trained
it; the objective and optimiser here are those of diffusers' SD3 LoRA training example.
"""

from configs import common
from tsdsr_jax.training.flow_matching import FlowMatchingConfig
from tsdsr_jax.training.optim import OptimConfig
from tsdsr_jax.training.run_config import SampleSection


def get_config():
    c = common.get_config()
    c.stage = "teacher"
    c.model = "models/sd3"            # a model directory from `tsdsr-convert`
    c.workdir = "workdirs/teacher"
    c.total_steps = 20_000
    c.batch_size = 4                  # global, split over all devices
    c.init_teacher = "random"         # random (peft init) | model (the model dir's teacher LoRA)
    c.teacher_rank = 64               # at the student's targets, as the released teacher
    c.flow = common.section(FlowMatchingConfig)
    c.optim_teacher = common.section(OptimConfig, learning_rate=1e-4, warmup_steps=500,
                                     schedule="constant_with_warmup")
    # the validation images: HR | noised | denoised by the teacher | sampled from noise
    c.sample = common.section(SampleSection, num_steps=28, guidance_scale=7.0, strength=0.6)
    c.checkpoint_every = 2000
    return c
