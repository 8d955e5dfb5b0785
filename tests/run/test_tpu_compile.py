"""TPU slices named as gcloud and jax name them, the HLO collective count, the fitting
batch, and the error without libtpu (no TPU compile: tests/modes/test_compile.py)."""
import pytest

from corinfomax_jax import errors
from corinfomax_jax.run import tpu_compile


@pytest.mark.parametrize("name, jax_name, chips", [
    ("v5litepod-16", "v5e:4x4", 16),
    ("v5e-16", "v5e:4x4", 16),
    ("v5litepod-256", "v5e:16x16", 256),
    ("v5litepod-8", "v5e:2x4", 8),
    ("v5litepod-1", "v5e:1x1", 1),
    ("v6e-64", "v6e:8x8", 64),
    ("v4-8", "v4:2x2x1", 4),
    ("v4-32", "v4:2x2x4", 16),  # v4-N counts TensorCores, two per chip
    ("v4-128", "v4:4x4x4", 64),
    ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-256", "v5p:4x4x8", 128),
    ("v5e:4x8", "v5e:4x8", 32),
    ("v4:2x2x2", "v4:2x2x2", 8),
])
def test_topology_names_map_to_jax_slices(name, jax_name, chips):
  s = tpu_compile.parse_topology(name)
  assert (s.topology, s.chips) == (jax_name, chips)


@pytest.mark.parametrize("name", ["v5litepod-12", "v4-6", "v4-2", "v7-8", "v5e:4",
                                  "v4:4x4", "tpu", ""])
def test_unknown_topologies_are_named_in_one_error_line(name):
  with pytest.raises(errors.ConfigError) as e:
    tpu_compile.parse_topology(name)
  assert repr(name) in str(e.value) and "\n" not in str(e.value)


HLO = """\
ENTRY %main {
  %all-reduce.28 = f32[64]{0:T(128)S(1)} all-reduce(%a), channel_id=1, to_apply=%add
  %all-reduce.50 = (f32[64]{0:T(128)S(1)}, bf16[2,8]{1,0}) all-reduce(%b, %c), to_apply=%add
  %ars = f32[4,4]{1,0} all-reduce-start(%d), to_apply=%add
  %ard = f32[4,4]{1,0} all-reduce-done(%ars)
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(%e), dimensions={0}
  %agd = f32[8]{0} all-gather-done(%ags)
  %fusion.1 = f32[64]{0} fusion(%all-reduce.28), kind=kLoop, calls=%fused
}
"""


def test_collectives_counts_each_instruction_once_with_its_result_bytes():
  assert tpu_compile.collectives(HLO) == {
      "all-reduce": {"count": 3, "bytes": 64 * 4 + (64 * 4 + 16 * 2) + 16 * 4},
      "all-gather": {"count": 1, "bytes": 8 * 4}}


def test_largest_fitting_batch_extrapolates_the_temporaries_linearly():
  gib = tpu_compile.GIB
  report = {"memory_bytes": {"temporaries": 20 * gib}, "hbm_needed_bytes": 24 * gib,
            "hbm_bytes": 16 * gib, "per_chip_batch": 128}
  # 4 GiB stay; 20 GiB / 128 pairs each: (16 - 4) GiB hold 76.8 pairs, 72 in eights.
  assert tpu_compile.largest_fitting_batch(report) == 72


def test_without_libtpu_the_error_says_what_to_install():
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("libtpu is installed in this environment")
  except ImportError:
    pass
  with pytest.raises(errors.ConfigError, match=r'pip install "jax\[tpu\]=='):
    tpu_compile.slice_devices(tpu_compile.parse_topology("v5e-4"))
