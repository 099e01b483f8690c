"""`python -m convert` and `python -m convert.export` on checkpoints written by diffusers and peft."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import set_peft_model_state_dict

from conftest import convert_release, rel_err
from tsdsr_jax.conversion.command import main as convert_main
from tsdsr_jax.conversion.export import main as export_main
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.safetensors import SafeTensors
from tsdsr_jax.models import lora
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.vae import AutoencoderKL


def torch_transformer(release, adapter, latents_nchw, timestep):
    t = release.transformer
    if adapter is None:
        t.disable_adapters()
    else:
        t.enable_adapters()
        t.set_adapter(adapter)
    with torch.no_grad():
        out = t(hidden_states=latents_nchw, timestep=timestep,
                encoder_hidden_states=release.prompt_embeds,
                pooled_projections=release.pooled_prompt_embeds).sample
    t.enable_adapters()
    t.set_adapter("default")
    return out.numpy().transpose(0, 2, 3, 1)


def ours_transformer(model, variables, latents_nchw, timestep):
    config = dataclasses.replace(model.transformer_config, attention_impl="xla")
    emb = model.embeddings["default"]
    return np.asarray(MMDiT(config).apply(
        variables, jnp.asarray(latents_nchw.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(timestep.numpy()), emb["prompt_embeds"][None],
        emb["pooled_prompt_embeds"][None]))


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def converted(request, tmp_path_factory):
    release = request.getfixturevalue("release" if request.param == "sd3" else "release_sd35")
    out = tmp_path_factory.mktemp("converted") / "model"
    convert_release(release, out, "lora", "teacher", "embeddings", "null")
    return release, model_dir.load(out)


@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_transformer_with_adapters_equals_diffusers_peft(converted, size):
    release, model = converted
    torch.manual_seed(5)
    latents = torch.randn(2, 4, *size)
    timestep = torch.tensor([1000.0, 417.5])
    base = model.params["transformer"]
    for adapter, name in ((None, None), ("default", "student"), ("teacher", "teacher")):
        want = torch_transformer(release, adapter, latents, timestep)
        variables = {"params": base} if name is None else {"params": base,
                                                            "lora": model.adapters[name]}
        assert rel_err(ours_transformer(model, variables, latents, timestep), want) <= 1e-5
    merged = {"params": lora.merge(base, model.adapters["student"])}
    want = torch_transformer(release, "default", latents, timestep)
    assert rel_err(ours_transformer(model, merged, latents, timestep), want) <= 1e-5


def test_vae_with_encoder_adapter_equals_diffusers_peft(converted):
    release, model = converted
    torch.manual_seed(6)
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = release.vae.encode(image).latent_dist
        want_mean = posterior.mean.numpy().transpose(0, 2, 3, 1)
        release.vae.disable_adapters()
        want_decoded = release.vae.decode(posterior.mean).sample.numpy().transpose(0, 2, 3, 1)
        release.vae.enable_adapters()
    vae = AutoencoderKL(model.vae_config)
    variables = {"params": model.params["vae"], "lora": model.adapters["student_vae"]}
    mean, _ = vae.apply(variables, jnp.asarray(image.numpy().transpose(0, 2, 3, 1)),
                        method="encode")
    assert rel_err(mean, want_mean) <= 1e-5
    decoded = vae.apply({"params": model.params["vae"]}, jnp.asarray(want_mean), method="decode")
    assert rel_err(decoded, want_decoded) <= 1e-5


def test_model_dir_contents(converted):
    release, model = converted
    config = json.loads((model.path / model_dir.CONFIG).read_text())
    assert set(config["adapters"]) == {"student", "student_vae", "teacher"}
    assert config["adapters"]["student"]["rank"] == 4
    assert model.vae_config.scaling_factor == 1.5305 and model.vae_config.shift_factor == 0.0
    np.testing.assert_array_equal(model.embeddings["default"]["prompt_embeds"],
                                  release.prompt_embeds[0].numpy())
    np.testing.assert_array_equal(model.embeddings["default"]["pooled_prompt_embeds"],
                                  release.pooled_prompt_embeds[0].numpy())
    null = torch.load(release.null_embeddings / "prompt_embeds.pt", weights_only=True)
    np.testing.assert_array_equal(model.embeddings["null"]["prompt_embeds"], null[0].numpy())
    assert not list(model.path.parent.glob(".*partial*"))


def test_bf16_base_and_fp32_adapters(release, tmp_path):
    out = tmp_path / "model"
    assert convert_main(["--sd3", str(release.sd3), "--lora", str(release.lora),
                         "--out", str(out)]) == 0
    base = SafeTensors(out / "transformer.safetensors")
    assert all(base[k].dtype == ml_dtypes.bfloat16 for k in base)
    adapter = SafeTensors(out / "adapter_student.safetensors")
    assert all(adapter[k].dtype == np.float32 for k in adapter)
    assert set(json.loads((out / "config.json").read_text())["adapters"]) == {"student",
                                                                              "student_vae"}


def test_export_round_trip_loads_into_diffusers_peft(converted, tmp_path):
    """Our adapters -> official files -> the official loading path -> the same outputs."""
    release, model = converted
    assert export_main(["--model", str(model.path), "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"transformer.safetensors", "vae.safetensors",
                                                    "teacher.safetensors"}
    for file, adapter in (("transformer.safetensors", "default"),
                          ("teacher.safetensors", "teacher")):
        official = StableDiffusion3Pipeline.lora_state_dict(tmp_path, weight_name=file)
        torch.manual_seed(0)
        released = {k: v for k, v in official.items()}
        release.transformer.add_adapter(
            release.transformer.peft_config[adapter], adapter_name="roundtrip")
        state = {k.removeprefix("transformer."): v for k, v in released.items()}
        result = set_peft_model_state_dict(release.transformer, state, adapter_name="roundtrip")
        assert not result.unexpected_keys
        latents, timestep = torch.randn(1, 4, 8, 8), torch.tensor([1000.0])
        want = torch_transformer(release, adapter, latents, timestep)
        got = torch_transformer(release, "roundtrip", latents, timestep)
        release.transformer.delete_adapters("roundtrip")
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    vae_state = StableDiffusion3Pipeline.lora_state_dict(tmp_path, weight_name="vae.safetensors")
    original = StableDiffusion3Pipeline.lora_state_dict(release.lora, weight_name="vae.safetensors")
    assert vae_state.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(vae_state[k].numpy(), original[k].numpy())


# ------------------------------------------------------------------------------ bad input


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)],
                          capture_output=True, text=True)


def assert_refused(code_or_proc, out, *needles, capsys=None):
    if isinstance(code_or_proc, int):
        assert code_or_proc == 2
        err = capsys.readouterr().err
    else:
        assert code_or_proc.returncode == 2
        err = code_or_proc.stderr
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_cli_rejects_non_sd3_folder(tmp_path):
    (tmp_path / "notsd3" / "transformer").mkdir(parents=True)
    (tmp_path / "notsd3" / "transformer" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    out = tmp_path / "model"
    proc = run_cli("--sd3", tmp_path / "notsd3", "--out", out)
    assert_refused(proc, out, "UNet2DModel", "not an SD3 folder", "vae/config.json: missing")


def copy_release(release, tmp_path):
    import shutil
    for name in ("sd3", "lora", "default"):
        shutil.copytree(getattr(release, name if name != "default" else "embeddings"),
                        tmp_path / name)
    return tmp_path / "sd3", tmp_path / "lora", tmp_path / "default"


def test_every_problem_is_named_and_nothing_is_written(release, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    sd3, lora_dir, emb = copy_release(release, tmp_path)
    # the VAE lacks a tensor and has a stray one; a transformer shard has a misshapen tensor
    vae_file = sd3 / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_file(vae_file)
    vae.pop("encoder.conv_in.bias")
    vae["encoder.extra.weight"] = torch.zeros(1)
    save_file(vae, vae_file)
    index = json.loads((sd3 / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
                       .read_text())["weight_map"]
    shard = sd3 / "transformer" / index["proj_out.weight"]
    tensors = load_file(shard)
    tensors["proj_out.weight"] = tensors["proj_out.weight"][:, :-1].contiguous()
    save_file(tensors, shard)
    # the student LoRA misses one layer; the pooled embedding has the wrong width
    lora_file = lora_dir / "transformer.safetensors"
    layers = load_file(lora_file)
    layers.pop("transformer.proj_out.lora_A.weight")
    save_file(layers, lora_file)
    torch.save(torch.zeros(1, 5), emb / "pool_embeds.pt")
    out = tmp_path / "model"
    code = convert_main(["--sd3", str(sd3), "--lora", str(lora_dir), "--embeddings", str(emb),
                         "--teacher-lora", str(tmp_path / "nope.safetensors"), "--out", str(out)])
    assert_refused(code, out, "missing tensor encoder.conv_in.bias",
                   "unexpected tensor encoder.extra.weight",
                   "tensor proj_out.weight has shape (16, 15), expected (16, 16)",
                   "missing tensor transformer.proj_out.lora_A.weight",
                   "pool_embeds.pt: shape (1, 5), expected (1, 16)",
                   "nope.safetensors: missing", capsys=capsys)


def test_truncated_and_unsafe_files_are_refused(release, tmp_path, capsys):
    sd3, lora_dir, emb = copy_release(release, tmp_path)
    vae_file = sd3 / "vae" / "diffusion_pytorch_model.safetensors"
    vae_file.write_bytes(vae_file.read_bytes()[:-100])
    torch.save({"not": "a tensor"}, emb / "prompt_embeds.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save(Evil(), emb / "pool_embeds.pt")
    out = tmp_path / "model"
    code = convert_main(["--sd3", str(sd3), "--embeddings", str(emb), "--out", str(out)])
    assert_refused(code, out, "diffusion_pytorch_model.safetensors: truncated",
                   "prompt_embeds.pt: holds a dict, expected a tensor",
                   "pool_embeds.pt: not a loadable torch tensor file", capsys=capsys)
    assert "pwned" not in capsys.readouterr().out


def test_existing_output_needs_force(release, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep").write_text("x")
    assert convert_main(["--sd3", str(release.sd3), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep").exists()
    assert convert_main(["--sd3", str(release.sd3), "--out", str(out), "--force"]) == 0
    assert not (out / "keep").exists() and (out / "config.json").exists()
