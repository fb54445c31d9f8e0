"""Checkpoint checksums: written before the completion marker, checked on load; a truncated or
bit-flipped file is named."""

from pathlib import Path

from stages.engine.checkpoint_integrity import is_disk_full, verify, write_checksums


def make_ckpt(root: Path) -> Path:
    ckpt = root / "step-000004"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (ckpt / "sub" / "common.pt").write_bytes(b"state" * 100)
    write_checksums(ckpt)
    (ckpt / "complete.json").write_text("{}")  # the marker comes after the checksums
    return ckpt


def test_intact_checkpoint_passes(tmp_path):
    assert verify(make_ckpt(tmp_path), "complete.json") is None


def test_truncated_flipped_and_missing_files_are_named(tmp_path):
    ckpt = make_ckpt(tmp_path)
    data = ckpt / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-10])
    assert verify(ckpt, "complete.json") == "__0_0.distcp has 16374 bytes, 16384 were written"
    ckpt = make_ckpt(tmp_path / "b")
    blob = bytearray((ckpt / "sub" / "common.pt").read_bytes())
    blob[7] ^= 0x80
    (ckpt / "sub" / "common.pt").write_bytes(bytes(blob))
    assert verify(ckpt, "complete.json") == "sub/common.pt does not match its SHA-256"
    ckpt = make_ckpt(tmp_path / "c")
    (ckpt / "sub" / "common.pt").unlink()
    assert verify(ckpt, "complete.json") == "sub/common.pt is missing"


def test_a_checkpoint_from_before_checksums_is_trusted(tmp_path):
    ckpt = make_ckpt(tmp_path)
    (ckpt / "checksums.json").unlink()
    assert verify(ckpt, "complete.json") is None


def test_disk_full_is_found_through_wrapping_exceptions():
    import errno

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("worker 0 failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(RuntimeError("something else"))
