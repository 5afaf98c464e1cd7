"""craft-run --estimate: device profiles parse, and the memory / speed model behaves."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import run_cli
from craft.runtime.artifact import Artifact
from craft.runtime.estimate import DeviceError, estimate, load_profiles, parse_profile
from craft.runtime.onnx_file import read_metadata


def test_shipped_profiles_parse():
    profiles = {p.name: p for p in load_profiles()}
    assert {"pi4", "pi5", "pi-zero-2w"} <= profiles.keys()
    zero = profiles["pi-zero-2w"]
    assert zero.memory_mb == 512 and zero.ort_wheel is False and zero.arch == "armv7l"
    assert profiles["pi5"].bandwidth_gbs > profiles["pi4"].bandwidth_gbs > zero.bandwidth_gbs


def test_bad_profile_is_one_line(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\nbandwdth_gbs: 3\n")
    with pytest.raises(DeviceError, match="unknown keys \\['bandwdth_gbs'\\]"):
        parse_profile(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("just words\n")
    with pytest.raises(DeviceError, match="line 1: expected 'key: value'"):
        parse_profile(tmp_path / "y.yaml")


def test_model_predicts_memory_fit_and_bandwidth_bound_speed(sp_int8, sp_fp32):
    art8, art32 = (Artifact.from_metadata(read_metadata(p)) for p in (sp_int8, sp_fp32))
    size8, size32 = sp_int8.stat().st_size, sp_fp32.stat().st_size
    pi4 = next(p for p in load_profiles() if p.name == "pi4")
    e8, e32 = estimate(art8, size8, pi4), estimate(art32, size32, pi4)
    assert e8.backend == "ort" and e8.fits and e8.tokens_per_s > e32.tokens_per_s  # fewer bytes per token
    faster = estimate(art8, size8, replace(pi4, bandwidth_gbs=pi4.bandwidth_gbs * 2))
    assert faster.tokens_per_s > e8.tokens_per_s
    tiny_board = replace(pi4, memory_mb=64, os_reserved_mb=32)
    assert not estimate(art8, size8, tiny_board).fits
    big = estimate(art8, 400 * 2**20, pi4)  # a 400 MB file
    assert big.rss_mb > 400 and big.tokens_per_s < e8.tokens_per_s
    assert estimate(art8, size8, pi4, backend="numpy").bytes_per_token > e8.bytes_per_token  # int8 expanded to float32


def test_a_steps_traffic_leaves_out_the_rope_tables(sp_int8):
    """A step reads one row of each RoPE table, not the tables (context x head_dim float32 each): a
    131k-context Llama-3.2 stores 64 MiB of them, counted as read every token."""
    art = Artifact.from_metadata(read_metadata(sp_int8))
    size, spec = sp_int8.stat().st_size, art.spec
    pi4 = next(p for p in load_profiles() if p.name == "pi4")
    e = estimate(art, size, pi4, backend="ort", context=16)
    rope = 2 * spec.context_length * spec.head_dim * 4
    assert e.bytes_per_token == size - rope + e.cache_bytes / 2 * 3


def test_cli_estimate_prints_every_device(sp_int8):
    result = run_cli("craft.runtime.cli", str(sp_int8), "--estimate")
    assert result.returncode == 0, result.stderr
    assert (
        "pi4" in result.stdout
        and "pi5" in result.stdout
        and "pi-zero-2w" in result.stdout
        and "tokens/s" in result.stdout
    )
    numpy_only = run_cli("craft.runtime.cli", str(sp_int8), "--estimate", "--backend", "numpy")
    assert all(" numpy " in line for line in numpy_only.stdout.splitlines()[1:])
