"""Bad input stops `launch/pretrain.py` with a non-zero exit and a message naming the problem,
before anything is written."""

import pytest

from tests.training import launcher


def _run_one(tmp_path, *overrides):
    output_dir = tmp_path / "run"
    codes, output = launcher.run(
        ["recipe=tiny", f"output_dir={output_dir}", "logging.wandb_mode=disabled", *overrides],
        world_size=1,
    )
    return codes[0], output, output_dir


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lerning_rate=1"], "optim.lerning_rate"),
        (["optim.lr=fast"], "optim.lr"),
        (["data.blend=[{path: /no/such/corpus, weight: 1.0}]"], "/no/such/corpus.bin"),
        (["model.vocab_size=128"], "model.vocab_size=128"),
        (["parallel.tensor_parallel=3"], "num_attention_heads"),
    ],
    ids=["unknown-key", "wrong-type", "missing-data", "vocab-too-small", "tp-not-dividing-heads"],
)
def test_bad_input_exits_before_writing(tmp_path, overrides, message):
    code, output, output_dir = _run_one(tmp_path, *overrides)
    assert code != 0
    assert message in output, output[-2000:]
    assert not output_dir.exists()


def test_output_dir_of_another_model_is_refused(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "config.yaml").write_text("model:\n  hidden_size: 96\n")
    code, output, _ = _run_one(tmp_path)
    assert code != 0
    assert "hidden_size: 96 -> 64" in output, output[-2000:]
    assert sorted(p.name for p in output_dir.iterdir()) == ["config.yaml"]


def test_layout_that_does_not_tile_the_job_is_refused(tmp_path):
    # The tiny recipe's layout is expert_parallel=2: one process cannot hold it.
    code, output, output_dir = _run_one(tmp_path)
    assert code != 0
    assert "stage s4k: world size 1" in output, output[-2000:]
    assert not output_dir.exists()


def test_single_stage_needs_the_previous_merged_model(tmp_path):
    code, output, output_dir = _run_one(tmp_path, "stage=s32k")
    assert code != 0
    assert "stage=s32k starts from" in output and "run the stage before it first" in output
    assert not output_dir.exists()
