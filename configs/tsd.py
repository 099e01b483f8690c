"""TSD-SR training as the paper: DASM (N = 4), batch 2 per GPU, 200 k steps (SPEC §4).

    python train.py --config configs/tsd.py --config.model=models/tsdsr \
        --config.data.roots=/data/lsdir,/data/ffhq --config.workdir=workdirs/tsd

The model directory needs the teacher LoRA, the null-prompt embeddings and LPIPS
(`python -m convert ... --teacher-lora … --null-embeddings … --lpips-backbone alexnet-….pth`).
The released run used 8 GPUs × batch 2 for about 96 hours.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "tsd"
    c.model = "models/tsdsr"          # a model directory from `python -m convert`
    c.workdir = "workdirs/tsd"
    c.seed = 43
    c.total_steps = 200_000
    c.batch_size = 2                  # global, split over all devices (released: 2 per GPU x 8)
    c.precision = "bf16"              # compute dtype of the frozen base (LoRA stays float32)
    c.remat_policy = "full"           # none | full | dots: rematerialise MMDiT and VAE blocks
    c.attention_impl = ml_collections.FieldReference("cudnn", field_type=str)  # cudnn | xla | None
    c.init_student = "random"         # random (peft init) | model (the model dir's student)
    # lora (the model dir's teacher LoRA) | sd3 (plain SD3) | a teacher run's checkpoints folder
    # (configs/teacher.py's WORKDIR/checkpoints: its latest teacher LoRA)
    c.teacher = "lora"
    c.student_rank = 64
    c.student_vae_rank = 64
    c.fake_score_rank = 64            # the released script's 64 (its default is 16)

    c.tsd = ml_collections.ConfigDict(dict(
        guidance_scale=7.5, dasm_steps=4, dasm_step_size=50, dasm_weights=(1.0, 0.3, 0.3, 0.3),
        random_bias=True, index_low=50, index_high=950, lambda_vsd=0.7, lpips_weight=1.0,
        mse_weight=1.0, weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0,
        mode_scale=1.29))
    optim = dict(warmup_steps=3000, total_steps=200_000, schedule="cosine", num_cycles=0.5,
                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, max_grad_norm=1.0)
    c.optim_student = ml_collections.ConfigDict(dict(optim, learning_rate=5e-6))
    c.optim_fake_score = ml_collections.ConfigDict(dict(optim, learning_rate=1e-6))

    c.data = ml_collections.ConfigDict(dict(
        roots=("data/train",), resolution=512, degrade=False, num_workers=4, skip_invalid=False,
        shards=0))                    # data streams (0: one per process; see train.py)
    # the mesh: data x fsdp devices (-1: fill); the frozen base is split over fsdp
    c.sharding = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, adapters="replicated", min_shard_size=2 ** 18))

    c.log_every = 10
    c.validate_every = 500
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3
    return c
