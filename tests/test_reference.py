"""The embedded reference pair: the shipped drafter is intact, loads, and actually predicts."""
from __future__ import annotations

import pytest

from dspark_export import reference


def test_shipped_drafter_matches_recorded_checksums():
    reference.verify_reference_draft()


def test_tampered_drafter_is_detected(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / reference.SHIPPED_DRAFT_NAME
    shutil.copytree(reference.reference_draft_dir(), copy)
    shutil.copy(reference.reference_data_dir() / "checksums.json", tmp_path / "checksums.json")
    data = bytearray((copy / "config.json").read_bytes())
    data[10] ^= 1
    (copy / "config.json").write_bytes(bytes(data))
    monkeypatch.setattr(reference, "reference_data_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        reference.verify_reference_draft()


@pytest.mark.slow
def test_shipped_drafter_accepts_tokens_on_the_reference_target():
    from dspark_export.decode import generate_speculative
    from dspark_export.pair import load_pair

    pair = load_pair()
    assert pair.drafter.config.block_size == 7 and pair.drafter.config.markov_rank == 64
    ids = pair.encode_prompt("Natalia sold 12 clips in April and twice as many in May. How many in total?")
    result = generate_speculative(pair.target, pair.drafter, ids, max_new_tokens=48, stop_ids=pair.stop_ids())
    # A random drafter gives tau = 1.0 here; the trained one must beat it clearly.
    assert result.stats.tau > 1.3, result.stats.to_dict()
