"""`python -m jaxsgl.roofline`: the ceilings file it writes, and reading one back."""

import json

import pytest

from jaxsgl import roofline
from jaxsgl.ceilings import Ceilings, read_ceilings


def test_main_writes_a_ceilings_file(tmp_path, capsys):
    out = tmp_path / "ceilings.json"
    assert roofline.main(["--out", str(out), "--copy-mib", "4", "--matmul-n", "64"]) == 0
    printed = capsys.readouterr()
    assert "measuring copy bandwidth" in printed.err and f"wrote {out}" in printed.out
    body = json.loads(out.read_text())
    assert body["copy_tb_s"] > 0 and body["matmul_tflop_s"] > 0 and body["device"]
    ceilings = read_ceilings(out)
    assert ceilings.copy_bytes_per_s == pytest.approx(body["copy_tb_s"] * 1e12)
    assert ceilings.matmul_flops_per_s == pytest.approx(body["matmul_tflop_s"] * 1e12)


def test_ceilings_floor_and_devices():
    c = Ceilings.of(2.0, 500.0, "card")
    assert c.floor(4e12, 1e15) == pytest.approx(2.0)  # 2 s memory vs 2 s compute
    assert c.times(4).floor(4e12, 0) == pytest.approx(0.5)
    assert c.bound(4e12, 1e14) == "memory" and c.bound(1e9, 1e15) == "compute"


def test_bad_ceilings_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_ceilings(tmp_path / "none.json")
    (tmp_path / "half.json").write_text('{"copy_tb_s": 3}')
    with pytest.raises(ValueError, match="needs copy_tb_s and matmul_tflop_s"):
        read_ceilings(tmp_path / "half.json")
    (tmp_path / "zero.json").write_text('{"copy_tb_s": 0, "matmul_tflop_s": 1}')
    with pytest.raises(ValueError, match="copy_bytes_per_s must be a positive number"):
        read_ceilings(tmp_path / "zero.json")
