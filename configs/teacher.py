"""The teacher LoRA: SD3 fine-tuned on HR images with the flow-matching loss (SPEC §1).

    python train.py --config configs/teacher.py --config.model=models/sd3 \
        --config.data.roots=/data/lsdir,/data/ffhq --config.workdir=workdirs/teacher

The model directory needs the null-prompt embeddings (`python -m convert --sd3 … \
--null-embeddings …`). The run's checkpoints feed TSD-SR directly
(`--config.teacher=workdirs/teacher/checkpoints` with configs/tsd.py), and
`python -m convert.export --checkpoint workdirs/teacher/checkpoints --out DIR` writes the
official `teacher.safetensors`. The authors released their teacher LoRA but not how they trained
it; the objective and optimiser here are those of diffusers' SD3 LoRA training example.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "teacher"
    c.model = "models/sd3"            # a model directory from `python -m convert`
    c.workdir = "workdirs/teacher"
    c.seed = 43
    c.total_steps = 20_000
    c.batch_size = 4                  # global, split over all devices
    c.precision = "bf16"              # compute dtype of the frozen base (LoRA stays float32)
    c.remat_policy = "full"           # none | full | dots: rematerialise MMDiT and VAE blocks
    c.attention_impl = ml_collections.FieldReference("cudnn", field_type=str)  # cudnn | xla | None
    c.init_teacher = "random"         # random (peft init) | model (the model dir's teacher LoRA)
    c.teacher_rank = 64               # at the student's targets, as the released teacher

    c.flow = ml_collections.ConfigDict(dict(
        weighting_scheme="logit_normal",  # logit_normal | mode | sigma_sqrt | cosmap | none
        logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
        precondition_outputs=True,        # the loss on x̂_0 = x_σ − σ v, as diffusers' example
        caption_dropout=0.1))             # captions dropped to the null prompt (for CFG)
    c.optim_teacher = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=500, total_steps=20_000, schedule="constant_with_warmup",
        num_cycles=0.5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, max_grad_norm=1.0))

    c.data = ml_collections.ConfigDict(dict(
        roots=("data/train",), resolution=512, degrade=False, num_workers=4, skip_invalid=False,
        shards=0))                    # data streams (0: one per process; see train.py)
    # the mesh: data x fsdp devices (-1: fill); the frozen base is split over fsdp
    c.sharding = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, adapters="replicated", min_shard_size=2 ** 18))
    # the validation images: HR | noised | denoised by the teacher | sampled from noise
    c.sample = ml_collections.ConfigDict(dict(num_steps=28, guidance_scale=7.0, strength=0.6))

    c.log_every = 10
    c.validate_every = 500
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    return c
