"""The chip files' codec (spec ``compression`` / ``compression_level``): other bytes, the same pixels."""

from __future__ import annotations

import pytest
import rasterio

from cropchips.errors import ConfigError
from cropchips.sources.hrefs import HrefPolicy
from cropchips.spec import DatasetSpec
from helpers import SpecProcessor


def _process(sample_area, sample_task, out, **spec):
    processor = SpecProcessor("z@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                              chip_size=64, hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)), **spec)
    result = processor.process(sample_task)
    assert result.status == "ok" and result.chips, result.error
    return result


@pytest.mark.parametrize("fmt", ["gtiff", "cog"])
def test_zstd_chips_hold_the_deflate_chips_pixels(sample_area, sample_task, tmp_path, fmt):
    plain = _process(sample_area, sample_task, tmp_path / "deflate", format=fmt)
    fast = _process(sample_area, sample_task, tmp_path / "zstd", format=fmt, compression="zstd", compression_level=1)
    assert [c.name for c in plain.chips] == [c.name for c in fast.chips]
    for chip in plain.chips:
        for rel in (chip.image, chip.mask):
            with rasterio.open(tmp_path / "deflate" / rel) as a, rasterio.open(tmp_path / "zstd" / rel) as b:
                assert a.compression.name.lower() == "deflate" and b.compression.name.lower() == "zstd"
                assert a.profile["dtype"] == b.profile["dtype"] and (a.read() == b.read()).all()


def _zlib_levels(path) -> set[int]:
    """FLEVEL of the zlib header of each band's first tile (RFC 1950: 0 fastest, 1 fast, 2 default, 3 best),
    which zlib and libdeflate write from the level they compressed at (1 -> 0, 6 -> 2, 9 -> 3)."""
    levels = set()
    with rasterio.open(path) as src:
        offsets = [int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=b)) for b in src.indexes]
    data = path.read_bytes()
    for offset in offsets:
        cmf, flg = data[offset], data[offset + 1]
        assert cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0  # a zlib stream of deflate
        levels.add(flg >> 6)
    return levels


@pytest.mark.parametrize("fmt", ["gtiff", "cog"])
def test_deflate_chips_are_written_at_level_1_unless_the_spec_names_another(sample_area, sample_task, tmp_path, fmt):
    default = _process(sample_area, sample_task, tmp_path / "default", format=fmt)
    usual = _process(sample_area, sample_task, tmp_path / "six", format=fmt, compression_level=6)
    assert [c.name for c in default.chips] == [c.name for c in usual.chips]
    for chip in default.chips:
        for rel in (chip.image, chip.mask):
            assert _zlib_levels(tmp_path / "default" / rel) == {0}  # level 1
            assert _zlib_levels(tmp_path / "six" / rel) == {2}  # GDAL's usual 6
            with rasterio.open(tmp_path / "default" / rel) as a, rasterio.open(tmp_path / "six" / rel) as b:
                assert (a.read() == b.read()).all()


def test_no_compression_writes_raw_tiles(sample_area, sample_task, tmp_path):
    result = _process(sample_area, sample_task, tmp_path / "raw", compression="none")
    with rasterio.open(tmp_path / "raw" / result.chips[0].image) as src:
        assert src.compression is None
        assert (tmp_path / "raw" / result.chips[0].image).stat().st_size >= src.width * src.height * src.count * 2


def test_levels_are_checked_against_the_codec():
    assert DatasetSpec(compression="deflate", compression_level=9).compression_level == 9
    with pytest.raises(ConfigError, match="zstd.*1..22"):
        DatasetSpec(compression="zstd", compression_level=23)
    with pytest.raises(ConfigError, match="lzw: it has no levels"):
        DatasetSpec(compression="lzw", compression_level=1)
    with pytest.raises(ConfigError, match="compression .* must be one of"):
        DatasetSpec(compression="jpeg")


def test_a_spec_at_the_default_codec_keeps_the_dataset_id_it_had_before_the_keys_existed():
    # The id of the default spec as release 0.3.0 computed it (before compression was a key).
    assert DatasetSpec().dataset_id() == "f056064f002b"
    assert DatasetSpec(compression="zstd").dataset_id() != "f056064f002b"
