"""The flow-matching schedule against diffusers' FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tsdsr_jax.diffusion import schedule


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_and_timesteps_equal_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    np.testing.assert_allclose(schedule.sigmas(1000, shift), ref.sigmas[:1000].numpy(),
                               rtol=1e-6, atol=0)
    np.testing.assert_allclose(schedule.timesteps(1000, shift), ref.timesteps.numpy(),
                               rtol=1e-6, atol=0)


def test_spec_endpoints():
    s, t = schedule.sigmas(), schedule.timesteps()
    assert s[0] == 1.0 and t[0] == 1000.0
    assert abs(s[999] - 0.00299) < 1e-5


def test_noising_and_euler_match_scheduler():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    rng = np.random.default_rng(0)
    x0, noise, v = (rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(3))
    idx = np.array([50, 700])
    sig = schedule.sigmas()[idx]
    ref_sig = ref.sigmas[idx].reshape(2, 1, 1, 1)
    xt = schedule.add_noise(x0, noise, sig)
    ref_xt = ref.scale_noise(torch.from_numpy(x0), ref.timesteps[idx], torch.from_numpy(noise))
    np.testing.assert_allclose(xt, ref_xt.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(schedule.predict_x0(xt, v, sig),
                               (torch.tensor(np.asarray(xt)) - ref_sig * torch.from_numpy(v)).numpy(),
                               rtol=1e-6, atol=1e-6)
    # diffusers shifts the sigmas it is given: pass the unshifted u_i of indices 50 and 51
    ref.set_timesteps(sigmas=[(1000 - 50) / 1000, (1000 - 51) / 1000])
    stepped = ref.step(torch.from_numpy(v[:1]), ref.timesteps[0], torch.from_numpy(x0[:1])).prev_sample
    s = schedule.sigmas()
    np.testing.assert_allclose(schedule.euler_step(x0[:1], v[:1], s[50:51], s[51:52]),
                               stepped.numpy(), rtol=1e-5, atol=1e-6)
