"""Dataset digests follow content and size, whole for small files and sampled for large ones."""

import pytest

from ring_train.data import fingerprint
from ring_train.data.fingerprint import differing_parts, file_digest


@pytest.fixture(params=["whole", "sampled"])
def mode(request, monkeypatch):
    if request.param == "sampled":
        monkeypatch.setattr(fingerprint, "WHOLE_FILE_LIMIT", 1000)
        monkeypatch.setattr(fingerprint, "BLOCK_BYTES", 64)
    return request.param


# Sampled mode reads 16 blocks of 64 bytes at 5056 * k // 15: bytes 0, 2700 (k = 8) and
# 5119 (the last) lie in blocks.
@pytest.mark.parametrize("position", [0, 2700, 5119])
def test_digest_changes_with_a_byte_or_the_size(tmp_path, mode, position):
    path = tmp_path / "data.bin"
    content = bytes(range(256)) * 20
    path.write_bytes(content)
    original = file_digest(str(path))
    assert file_digest(str(path)) == original

    changed = bytearray(content)
    changed[position] ^= 0xFF
    path.write_bytes(bytes(changed))
    assert file_digest(str(path)) != original

    path.write_bytes(content + b"\0")
    assert file_digest(str(path)) != original


def test_differing_parts_name_each_changed_part_with_both_values():
    saved = {"seq_length": 4096, "seed": 1, "stage": "4k"}
    current = {"seq_length": 32768, "seed": 1, "stage": "32k"}
    assert differing_parts(saved, current) == [
        "seq_length: 4096 -> 32768",
        "stage: '4k' -> '32k'",
    ]
