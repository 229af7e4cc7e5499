"""jaxsgl's default XLA flags are added once and never override the user's."""

import os

from jaxsgl import xla_flags


def test_defaults_added_to_empty_flags():
    env = {}
    defaults = "--xla_gpu_enable_triton_gemm=false --xla_disable_hlo_passes=dot-merger"
    xla_flags.apply_defaults(env)
    assert env["XLA_FLAGS"] == defaults
    xla_flags.apply_defaults(env)
    assert env["XLA_FLAGS"] == defaults


def test_user_flags_kept_and_win():
    given = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true"
    env = {"XLA_FLAGS": given}
    xla_flags.apply_defaults(env)
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8",
        "--xla_gpu_enable_triton_gemm=true",
        "--xla_disable_hlo_passes=dot-merger",
    ]


def test_a_users_list_of_disabled_passes_keeps_ours():
    env = {"XLA_FLAGS": "--xla_disable_hlo_passes=foo,bar"}
    xla_flags.apply_defaults(env)
    assert "--xla_disable_hlo_passes=foo,bar,dot-merger" in env["XLA_FLAGS"].split()
    xla_flags.apply_defaults(env)  # once only
    assert "--xla_disable_hlo_passes=foo,bar,dot-merger" in env["XLA_FLAGS"].split()


def test_importing_jaxsgl_set_the_process_flags():
    assert "--xla_gpu_enable_triton_gemm" in os.environ["XLA_FLAGS"]
    assert "--xla_disable_hlo_passes=dot-merger" in os.environ["XLA_FLAGS"]


def test_generator_is_importable_from_the_package():
    from jaxsgl import Generator
    from jaxsgl.generator import Generator as defined

    assert Generator is defined
