"""Two processes of two CPU devices each, talking through JAX's distributed runtime as
hosts do, train exactly as one process with four devices."""

import glob
import os
import socket
import subprocess

import jax
import numpy as np
from test_faults import final_params
from test_faults import main_command
from test_faults import read_scalars

# Three steps: with a batch of 8 the training dynamics are chaotic, and the last-bit
# differences of reduction order (gloo across processes vs in-process) grow about 40x a
# step, past 1e-4 of the loss by step 6; at step 3 they are still ~1e-7. A wrong global
# batch, data order or reduction shows from step 1.
STEPS = 3


def _env(num_devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(image_folder, tmp_path):
  # A small learning rate: a tiny network at lr 0.1 amplifies the last-bit differences of
  # reduction order (gloo across processes vs in-process) into visible ones in 6 steps.
  flags = [f"--config.max_steps={STEPS}", "--config.checkpoint_every_steps=3",
           "--config.learning_rate=0.01"]
  single = str(tmp_path / "single")
  subprocess.run(main_command(image_folder, single, *flags), env=_env(4), check=True,
                 capture_output=True, timeout=600)

  multi = str(tmp_path / "multi")
  address = f"127.0.0.1:{_free_port()}"
  procs = [
      subprocess.Popen(
          main_command(image_folder, multi, *flags, f"--coordinator_address={address}",
                       "--num_processes=2", f"--process_id={i}"),
          env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  assert "JAX process 1 of 2, 2 local of 4 devices" in outputs[1]
  # Only process 0 logs progress and writes metrics.
  assert f"step {STEPS}/{STEPS}" in outputs[0] and f"step {STEPS}/" not in outputs[1]
  assert len(glob.glob(os.path.join(multi, "events.out.tfevents.*"))) == 1

  losses_single = read_scalars(single, "train/loss")
  losses_multi = read_scalars(multi, "train/loss")
  assert sorted(losses_multi) == sorted(losses_single) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses_multi[s] for s in range(1, STEPS + 1)],
                             [losses_single[s] for s in range(1, STEPS + 1)], rtol=1e-4)
  step_s, params_s = final_params(single)
  step_m, params_m = final_params(multi)
  assert step_s == step_m == STEPS
  # One 4-device program here, two 2-device processes there: the device augmentation's
  # elementwise ops may fuse, and round, differently in the last bit. Mostly that stays
  # ~1e-7, but a pixel at a threshold (solarisation, the hue sector) can flip and move a
  # weight by ~1e-4 of the parameters' scale, so each leaf is compared on its mean
  # difference. A wrong global batch, data order or reduction would move every element
  # by the scale of an update (~1e-2 here).
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(params_s))
  for a, b in zip(jax.tree.leaves(params_m), jax.tree.leaves(params_s)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.mean(np.abs(a - b)) <= 1e-3 * np.mean(np.abs(b)) + 1e-6 * scale
    assert np.max(np.abs(a - b)) <= 1e-3 * scale
