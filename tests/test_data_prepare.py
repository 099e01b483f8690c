"""Preprocessing: caption embeddings equal diffusers' SD3 ``encode_prompt`` on tiny random
encoders (tokenizers built offline); latents equal the VAE; resumable; read back by the pipeline."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tsdsr_jax.data import prepare
from tsdsr_jax.data.batches import DataConfig, train_batches
from tsdsr_jax.data.source import SampleSpec, to_unit
from tsdsr_jax.data.text import encode_prompts, load_text_encoders
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.safetensors import SafeTensors, save_arrays
from tsdsr_jax.io.tree import flatten
from tsdsr_jax.models import mmdit
from tsdsr_jax.models import vae as vae_lib

WORDS = ["a", "photo", "of", "cat", "dog", "high", "quality", "detailed", "sharp"]
CAPTIONS = ["a photo of a cat", "high quality, detailed dog photo!", ""]


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE over the 256 byte symbols (+ word-final forms) and a few merges."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = [("p", "h"), ("o", "t</w>"), ("ph", "ot</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer() -> T5TokenizerFast:
    """A unigram vocabulary of a few words and single letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{w}", -1.0 - i) for i, w in enumerate(WORDS)]
    pieces += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz▁,!"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def clip(hidden: int, projection: int, vocab: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=3, num_attention_heads=2, projection_dim=projection,
                            max_position_embeddings=77, bos_token_id=vocab - 2,
                            eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return CLIPTextModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def sd3_text(tmp_path_factory) -> Path:
    """An SD3 folder with tiny random text encoders: CLIP-L 8 (+proj 6), CLIP-G 12 (+proj 10),
    T5 32 → prompt embeddings (333, 32), pooled (16,)."""
    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16)).eval()
    parts = {"tokenizer": tok, "tokenizer_2": tok, "tokenizer_3": t5_tok,
             "text_encoder": clip(8, 6, len(tok)), "text_encoder_2": clip(12, 10, len(tok)),
             "text_encoder_3": t5}
    for name, part in parts.items():
        part.save_pretrained(root / name)
    return root


def test_prompt_encoding_equals_diffusers(sd3_text):
    text = load_text_encoders(sd3_text)
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=text.encoders[0], tokenizer=text.tokenizers[0],
        text_encoder_2=text.encoders[1], tokenizer_2=text.tokenizers[1],
        text_encoder_3=text.encoders[2], tokenizer_3=text.tokenizers[2])
    embeds, pooled = encode_prompts(text, CAPTIONS)
    assert embeds.shape == (3, 333, 32) and pooled.shape == (3, 16)
    assert embeds.dtype == pooled.dtype == np.float32
    with torch.no_grad():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, device="cpu",
                                                         do_classifier_free_guidance=False)
    np.testing.assert_allclose(embeds, theirs.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, theirs_pooled.numpy(), atol=1e-5, rtol=0)
    assert np.abs(embeds[0] - embeds[1]).max() > 1e-3  # the captions matter


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, model_dir.Model]:
    """A model directory with the tiny VAE and transformer, random (cheaper than ``init``)."""
    path = tmp_path_factory.mktemp("model")
    transformer, vae = model_dir.TINY_TRANSFORMER, model_dir.TINY_VAE
    rng = np.random.default_rng(0)
    params = {"transformer": mmdit.abstract_params(transformer),
              "vae": vae_lib.abstract_params(vae)}
    params = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(a.dtype), params)
    model_dir.write_config(path / model_dir.CONFIG, transformer, vae, {})
    for net, tree in params.items():
        save_arrays(path / model_dir.network_file(net),
                    {k: np.asarray(v) for k, v in flatten(tree).items()})
    return path, model_dir.load(path)


def test_prepare_writes_reads_back_and_resumes(sd3_text, tiny_model, tmp_path):
    path, model = tiny_model
    root = tmp_path / "data"
    for folder in ("gt", "lr_bicubic", "prompt_txt"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n, caption in enumerate(CAPTIONS):
        for folder in ("gt", "lr_bicubic"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
                root / folder / f"{n}.png")
        (root / "prompt_txt" / f"{n}.txt").write_text(caption)
    args = ["--model", str(path), "--data", str(root),
            "--text-encoders", str(sd3_text), "--posterior", "mean", "--batch-size", "2"]
    assert prepare.main(args) == 0

    hr = to_unit(np.asarray(Image.open(root / "gt" / "1.png")))[None]
    mean, _ = vae_lib.AutoencoderKL(model.vae_config).apply(
        {"params": model.params["vae"]}, hr, method="encode")
    latent = SafeTensors(root / "latent_hr" / "1.safetensors")["latent_hr"]
    np.testing.assert_allclose(latent, np.asarray(mean[0]) * 1.5305, atol=1e-5)
    embeds, pooled = encode_prompts(load_text_encoders(sd3_text), CAPTIONS[1:2])
    stored = SafeTensors(root / "prompt_embeds" / "1.safetensors")["prompt_embeds"]
    np.testing.assert_allclose(stored, embeds[0], atol=1e-6)  # batched with another caption
    stored = SafeTensors(root / "pool_embeds" / "1.safetensors")["pooled_prompt_embeds"]
    np.testing.assert_allclose(stored, pooled[0], atol=1e-6)
    fixed = model_dir.load(path).embeddings
    null, _ = encode_prompts(load_text_encoders(sd3_text), [""])
    np.testing.assert_allclose(np.asarray(fixed["null"]["prompt_embeds"]), null[0], atol=1e-6)
    assert fixed["default"]["pooled_prompt_embeds"].shape == (16,)

    # resumable: finished files are left alone, a missing one is redone
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    (root / "latent_hr" / "2.safetensors").unlink()
    assert prepare.main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "2.safetensors")
    assert (root / "latent_hr" / "2.safetensors").is_file()

    spec = SampleSpec(resolution=32, prompt_shape=(333, 32), pooled_dim=16)
    batch = next(iter(train_batches(DataConfig(roots=(root,), batch_size=3, spec=spec,
                                               shard_index=0, shard_count=1))))
    assert batch["latent_hr"].shape == (3, 4, 4, 16)
    assert batch["prompt_embeds"].shape == (3, 333, 32)


def test_posterior_sample_is_seeded(tiny_model, tmp_path):
    path, _ = tiny_model
    root = tmp_path / "data"
    (root / "gt").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "gt" / "0.png")
    out = []
    for seed in (0, 0, 1):
        for f in (root / "latent_hr").glob("*"):
            f.unlink()
        prepare.main(["--model", str(path), "--data", str(root), "--seed", str(seed)])
        out.append(np.array(SafeTensors(root / "latent_hr" / "0.safetensors")["latent_hr"]))
    np.testing.assert_array_equal(out[0], out[1])
    assert np.abs(out[0] - out[2]).max() > 0
