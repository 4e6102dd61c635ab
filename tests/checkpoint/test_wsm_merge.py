"""The streamed WSM merge on synthetic weights-only checkpoints: it writes the weighted sum
(fp32 accumulation, source dtype), refuses checkpoints of different models, and holds a few
tensors, not a model, in memory. tools/wsm_merge.py is a thin CLI over it."""

import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.marker import read_marker
from ring_train.checkpoint.streaming import CheckpointReader, write_weights_checkpoint
from ring_train.checkpoint.wsm import merge_checkpoints, merge_weights
from ring_train.testing.multiprocess import run_ranks

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = [0.2, 0.3, 0.5]
SHAPES = {"embedding.weight": (8, 16), "decoder.layers.0.norm.weight": (5,), "experts": (2, 3, 4)}


def _write(path, step, tensors):
    infos = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
    return write_weights_checkpoint(path, step, infos, [], lambda key: tensors[key], details={})


def _random_model(seed, dtype=torch.float32, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator).to(dtype) for key, shape in shapes.items()}


def _sources(tmp_path, dtype=torch.float32):
    models = [_random_model(seed, dtype) for seed in range(3)]
    paths = [_write(tmp_path / f"iter_{i}", 10 * (i + 1), m) for i, m in enumerate(models)]
    return paths, models


def _read_all(path):
    reader = CheckpointReader(path)
    return {key: reader.tensor(key) for key in reader.tensors}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_the_weighted_sum_in_the_source_dtype(tmp_path, dtype):
    paths, models = _sources(tmp_path, dtype)
    output = merge_checkpoints(paths, WEIGHTS, tmp_path / "merged")
    merged = _read_all(output)
    assert set(merged) == set(SHAPES)
    for key in SHAPES:
        want = sum(w * m[key].float() for w, m in zip(WEIGHTS, models)).to(dtype)
        assert merged[key].dtype == dtype
        rtol, atol = (1e-6, 1e-7) if dtype == torch.float32 else (8e-3, 1e-5)
        assert torch.allclose(merged[key].float(), want.float(), rtol=rtol, atol=atol), key
    marker = read_marker(output)
    assert (marker.kind, marker.step, marker.model_keys) == ("weights", 30, sorted(SHAPES))
    assert marker.details["merge_weights"] == WEIGHTS


def test_uniform_merge_is_the_plain_mean(tmp_path):
    paths, models = _sources(tmp_path)
    merged = _read_all(merge_checkpoints(paths, merge_weights("uniform", 3), tmp_path / "mean"))
    for key in SHAPES:
        mean = torch.stack([m[key] for m in models]).mean(dim=0)
        assert torch.allclose(merged[key], mean, rtol=1e-6, atol=1e-7)


def test_checkpoints_of_different_models_are_refused_naming_key_and_shapes(tmp_path):
    paths, _ = _sources(tmp_path)
    wider = _write(tmp_path / "wider", 40, _random_model(3, shapes={**SHAPES, "experts": (2, 3, 5)}))
    with pytest.raises(CheckpointError, match=r"tensor experts is shape \(2, 3, 4\) torch.float32 "
                       r"in the first and shape \(2, 3, 5\) torch.float32 in the second"):
        merge_checkpoints([paths[0], paths[1], wider], WEIGHTS, tmp_path / "out")
    fewer = _write(tmp_path / "fewer", 40, {"embedding.weight": torch.zeros(8, 16)})
    with pytest.raises(CheckpointError, match="decoder.layers.0.norm.weight is shape .* and absent"):
        merge_checkpoints([paths[0], fewer], [0.5, 0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_bad_weights_an_existing_output_and_a_corrupted_source_are_refused(tmp_path):
    paths, _ = _sources(tmp_path)
    with pytest.raises(CheckpointError, match="sum to 1"):
        merge_checkpoints(paths, [0.5, 0.5, 0.5], tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        merge_checkpoints(paths, WEIGHTS, tmp_path / "taken")
    shard = next(paths[1].glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard} is corrupted: SHA-256"):
        merge_checkpoints(paths, WEIGHTS, tmp_path / "out")


def _cli():
    spec = importlib.util.spec_from_file_location("wsm_merge", REPO / "tools" / "wsm_merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_orders_inputs_by_step_and_merges_by_shape_or_weights(tmp_path, capsys):
    paths, models = _sources(tmp_path)
    shuffled = [str(paths[2]), str(paths[0]), str(paths[1])]
    cli = _cli()
    assert cli.main([*shuffled, "--weights", *map(str, WEIGHTS), "--output", str(tmp_path / "w")]) == 0
    merged = _read_all(tmp_path / "w")
    for key in SHAPES:  # weights went to the checkpoints oldest first, not in argument order
        want = sum(w * m[key] for w, m in zip(WEIGHTS, models))
        assert torch.allclose(merged[key], want, rtol=1e-6, atol=1e-7)
    assert cli.main([*shuffled, "--shape", "linear", "--output", str(tmp_path / "lin")]) == 0
    merged = _read_all(tmp_path / "lin")
    for key in SHAPES:
        mean = torch.stack([m[key] for m in models]).mean(dim=0)
        assert torch.allclose(merged[key], mean, rtol=1e-6, atol=1e-7)
    assert f"0.200000  {paths[0]}" in capsys.readouterr().out


def test_cli_exits_nonzero_naming_the_mismatched_key(tmp_path):
    paths, _ = _sources(tmp_path)
    wider = _write(tmp_path / "wider", 40, _random_model(3, shapes={**SHAPES, "experts": (2, 3, 5)}))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "wsm_merge.py"), str(paths[0]), str(wider),
         "--shape", "uniform", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 1
    assert "error: cannot merge" in result.stderr and "experts" in result.stderr
    assert not (tmp_path / "out").exists()


# --- memory -------------------------------------------------------------------------------

TENSORS, NUMEL = 24, 1 << 20  # a 96 MiB fp32 model of 4 MiB tensors


def _peak_growth_of_merge(rank, small, big, output):
    """Growth of this process's peak RSS while merging `big`, after a warm-up merge of `small`
    (imports, first-use allocations)."""
    merge_checkpoints(small, WEIGHTS, output + "-warmup")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    merge_checkpoints(big, WEIGHTS, output)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def _constant_model(path, step, value, tensors, numel):
    infos = {f"t{i}": ((numel,), torch.float32) for i in range(tensors)}
    return str(write_weights_checkpoint(
        path, step, infos, [], lambda key: torch.full((numel,), float(value)), details={}
    ))


@pytest.mark.slow
def test_streamed_merge_holds_a_few_tensors_not_a_model(tmp_path, monkeypatch):
    small = [_constant_model(tmp_path / f"s{i}", i + 1, i, 2, 1000) for i in range(3)]
    big = [_constant_model(tmp_path / f"b{i}", i + 1, i, TENSORS, NUMEL) for i in range(3)]
    # Memory above 1 MiB is mapped per allocation and unmapped on free, so peak RSS follows the
    # live tensors instead of what the allocator keeps cached.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    growth = run_ranks(_peak_growth_of_merge, 1, small, big, str(tmp_path / "merged"), timeout=120)[0]
    # Accumulator, the source tensor being read and its read buffer, the tensor being written:
    # about 4 tensors, whatever the number of tensors (24) in the model.
    assert growth <= 6 * NUMEL * 4, f"peak grew by {growth / NUMEL / 4:.1f} tensors"
    merged = CheckpointReader(tmp_path / "merged").tensor("t7")
    assert torch.allclose(merged, torch.full((NUMEL,), 0.2 * 0 + 0.3 * 1 + 0.5 * 2))
