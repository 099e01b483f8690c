"""LoRA layers, adapter initialisation and merging against peft."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from tsdsr_jax.conversion.torch_layout import to_flax, torch_name
from tsdsr_jax.io.tree import flatten, nest
from tsdsr_jax.models import lora


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.proj = torch.nn.Conv2d(6, 8, 2, stride=2)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(8, 5)])

    def forward(self, x):
        x = self.proj(torch.nn.functional.silu(self.conv_in(x)))
        return self.to_out[0](x.permute(0, 2, 3, 1))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = lora.Conv(6, (3, 3), strides=(2, 2), padding=1, name="conv_in")(x)
        x = lora.Conv(8, (2, 2), strides=(2, 2), name="proj")(nn.silu(x))
        return lora.Dense(5, name="to_out.0")(x)


TARGETS = ["conv_in", "proj", "to_out.0"]


def peft_state(peft_net):
    """peft's adapter state dict without the ``base_model.model.`` wrapper prefix."""
    return {k.removeprefix("base_model.model."): v
            for k, v in get_peft_model_state_dict(peft_net).items()}


def to_tree(state_dict, skeleton):
    flat = flatten(skeleton)
    return nest({p: jnp.asarray(to_flax(p, state_dict[torch_name(p)].detach().numpy()))
                 for p in flat})


@pytest.fixture
def nets():
    torch.manual_seed(0)
    ref = TorchNet()
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 16)).astype(np.float32)
    base_shapes = jax.eval_shape(FlaxNet().init, jax.random.key(0), jnp.zeros((1, 12, 16, 3)))
    base = to_tree(ref.state_dict(), base_shapes["params"])
    peft_net = get_peft_model(ref, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                              target_modules=TARGETS))
    return peft_net, base, x


def test_adapter_shapes_and_init_follow_peft(nets):
    peft_net, base, _ = nets
    ref = {k: tuple(v.shape) for k, v in peft_state(peft_net).items()}
    ours = flatten(lora.init_adapter(jax.random.key(1), base, TARGETS, rank=4))
    assert {torch_name(p) for p in ours} == set(ref)
    for p, v in ours.items():
        assert to_flax(p, np.zeros(ref[torch_name(p)])).shape == v.shape
    a = ours["to_out.0.lora_A"]
    assert abs(float(a.std()) - 1 / 4) < 0.1 and not flatten(ours)["to_out.0.lora_B"].any()


def test_lora_forward_and_merge_equal_peft(nets):
    peft_net, base, x = nets
    torch.manual_seed(1)
    for name, p in peft_net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        want = peft_net(torch.from_numpy(x)).numpy()
    adapter = to_tree(peft_state(peft_net),
                      lora.init_adapter(jax.random.key(0), base, TARGETS, rank=4))
    x_nhwc = x.transpose(0, 2, 3, 1)
    got = FlaxNet().apply({"params": base, "lora": adapter}, x_nhwc)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 1e-5
    without = FlaxNet().apply({"params": base}, x_nhwc)
    assert np.abs(without - want).max() / scale > 1e-2  # the adapter matters
    merged = FlaxNet().apply({"params": lora.merge(base, adapter)}, x_nhwc)
    assert np.abs(merged - want).max() / scale < 1e-5
    peft_merged = peft_net.merge_and_unload().state_dict()
    ours_merged = flatten(lora.merge(base, adapter))
    for p, v in ours_merged.items():
        np.testing.assert_allclose(v, to_flax(p, peft_merged[torch_name(p)].numpy()),
                                   rtol=1e-5, atol=1e-6)


def test_merge_rejects_foreign_layer(nets):
    _, base, _ = nets
    adapter = {"nope": {"lora_A": jnp.zeros((8, 2)), "lora_B": jnp.zeros((2, 5))}}
    with pytest.raises(ValueError, match="nope"):
        lora.merge(base, adapter)


def test_targets_that_match_nothing_fail(nets):
    _, base, _ = nets
    with pytest.raises(ValueError, match="match no"):
        lora.init_adapter(jax.random.key(0), base, ["to_q"], rank=4)
