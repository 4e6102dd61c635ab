"""WSM: anneal by merging constant-LR checkpoints instead of decaying the learning rate
(Tian et al., arXiv 2507.17634; ARCH_SPEC §6).

Merge weights from a decay shape. Candidates θ_0 … θ_k (N = k + 1 of them, K steps apart, the
newest last) merged as Σ_j c_j θ_j equal θ_0 − Σ_{i=1..k} w_i g_i, where g_i are the updates
between θ_{i-1} and θ_i and w_i = Σ_{j>=i} c_j is the decay coefficient they receive. The
inverse map turns a decay 1 >= w_1 >= … >= w_k >= 0 into merge weights:

    c_k = w_k,    c_j = w_j − w_{j+1} (1 <= j < k),    c_0 = 1 − w_1.

Discretization. A decay curve f on [0, 1] (f(0) = 1, f(1) = 0) is laid over the window of
N·K steps that ends at θ_k, so θ_j sits at t = (j + 1)/N. Each interval's updates take the
curve's value at the interval's start, i.e. at the candidate that opens it:

    w_i = f(i / N),  i = 1 … k.

The updates before θ_0 are fixed in θ_0 (weight 1 = f(0), consistent with the rule). Under
this rule the linear curve f(t) = 1 − t gives c_j = 1/N for every j: the plain mean, which
is the shape "uniform" (Thm 3.1: uniform averaging ≙ linear decay).

The merge itself streams: one tensor key at a time, each source read in turn and accumulated
in fp32, the sum written in the sources' dtype before the next key is read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

from ring_train.checkpoint import collective
from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.integrity import verify_files
from ring_train.checkpoint.layout import complete_checkpoints, resolve_checkpoint
from ring_train.checkpoint.marker import CompletionMarker, read_marker
from ring_train.checkpoint.streaming import CheckpointReader, refuse_existing, write_weights_checkpoint
from ring_train.config.checkpoint import CUSTOM_SHAPE, WEIGHTS_SUM_TOLERANCE, WSMConfig

logger = logging.getLogger(__name__)

DECAY_CURVES: Dict[str, Callable[[float], float]] = {
    "linear": lambda t: 1.0 - t,
    "1-sqrt": lambda t: 1.0 - math.sqrt(t),
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
}


def decay_coefficients(shape: str, num_candidates: int) -> List[float]:
    """w_1 … w_k (k = num_candidates − 1): the decay curve `shape` sampled at the candidates
    that open each interval, w_i = f(i / num_candidates)."""
    curve = DECAY_CURVES[shape]
    return [curve(i / num_candidates) for i in range(1, num_candidates)]


def merge_weights_from_decay(decay: Sequence[float]) -> List[float]:
    """The inverse map: c_0 … c_k from w_1 … w_k (non-increasing, within [0, 1])."""
    w = list(decay)
    if any(not 0.0 <= x <= 1.0 for x in w) or any(a < b for a, b in zip(w, w[1:])):
        raise ValueError(f"decay coefficients {w} must be non-increasing within [0, 1]")
    if not w:
        return [1.0]
    return [1.0 - w[0]] + [w[j] - w[j + 1] for j in range(len(w) - 1)] + [w[-1]]


def merge_weights(shape: str, num_candidates: int) -> List[float]:
    """Merge weights c_0 … c_k of the candidates, oldest first, for a named shape."""
    if shape == "uniform":
        return [1.0 / num_candidates] * num_candidates
    if shape not in DECAY_CURVES:
        raise ValueError(f"unknown WSM shape {shape!r}; known: uniform, {', '.join(DECAY_CURVES)}")
    return merge_weights_from_decay(decay_coefficients(shape, num_candidates))


def config_merge_weights(config: WSMConfig) -> List[float]:
    if config.shape == CUSTOM_SHAPE:
        return list(config.weights)
    return merge_weights(config.shape, config.num_candidates)


def _sources_agree(readers: List[CheckpointReader], markers: List[CompletionMarker]) -> None:
    """Raise CheckpointError naming both checkpoints and the first key where a source's model
    (keys, shapes, dtypes) differs from the first source's."""
    first, first_keys = readers[0], set(markers[0].model_keys)
    for reader, marker in zip(readers[1:], markers[1:]):
        keys = set(marker.model_keys)
        for key in sorted(first_keys | keys):
            ours = first.tensors.get(key) if key in first_keys else None
            theirs = reader.tensors.get(key) if key in keys else None
            if ours != theirs:
                raise CheckpointError(
                    f"cannot merge {first.directory} and {reader.directory}: tensor {key} is "
                    f"{_describe(ours)} in the first and {_describe(theirs)} in the second."
                )
        if marker.model_objects != markers[0].model_objects:
            raise CheckpointError(
                f"cannot merge {first.directory} and {reader.directory}: their models have "
                "different modules (non-tensor entries differ)."
            )


def _describe(info) -> str:
    return "absent" if info is None else f"shape {info[0]} {info[1]}"


def _weighted_sum(readers: List[CheckpointReader], weights: Sequence[float], key: str) -> torch.Tensor:
    shape, dtype = readers[0].tensors[key]
    total = torch.zeros(shape, dtype=torch.float32)
    for reader, weight in zip(readers, weights):
        total.add_(reader.tensor(key), alpha=weight)  # fp32 accumulation of any source dtype
    return total.to(dtype)


def merge_checkpoints(
    sources: Sequence[Path], weights: Sequence[float], output: Path, checksums: bool = True
) -> Path:
    """Write Σ_j weights[j] · model(sources[j]) as a weights-only checkpoint at `output`.

    `sources` are checkpoints (weights-only or training; only model tensors are merged) of one
    model, `weights` one per source, >= 0, summing to 1. Runs in this process alone; inside a
    distributed job call it on one rank. Memory: a few copies of the largest tensor, never a
    whole model. `output` appears complete or not at all (written under `<output>.tmp`, then
    renamed).
    """
    if len(weights) != len(sources) or not sources:
        raise CheckpointError(f"{len(sources)} checkpoints to merge but {len(weights)} weights.")
    if any(w < 0 for w in weights) or abs(math.fsum(weights) - 1.0) > WEIGHTS_SUM_TOLERANCE:
        raise CheckpointError(f"merge weights {list(weights)} must be >= 0 and sum to 1.")
    refuse_existing(output)
    with collective.alone():
        checkpoints = [resolve_checkpoint(Path(s)) for s in sources]
        markers = [read_marker(c) for c in checkpoints]
        for checkpoint, marker in zip(checkpoints, markers):
            verify_files(checkpoint, marker.files, checksums)
    readers = [CheckpointReader(c) for c in checkpoints]
    _sources_agree(readers, markers)
    tensors = {key: readers[0].tensors[key] for key in markers[0].model_keys}

    def produce(key: str):
        if key in tensors:
            return _weighted_sum(readers, weights, key)
        return readers[0].object(key)  # module extra state: the same in every source

    write_weights_checkpoint(
        output,
        step=max(m.step for m in markers),
        tensors=tensors,
        objects=markers[0].model_objects,
        produce=produce,
        details={"merged_from": [str(c) for c in checkpoints], "merge_weights": list(weights)},
        checksums=checksums,
    )
    logger.info("merged %d checkpoints into %s with weights %s", len(sources), output, list(weights))
    return output


def oldest_first(sources: Sequence[Path]) -> List[Path]:
    """The complete checkpoints `sources` designate, ordered by their saved step; raises
    CheckpointError if two were saved at the same step."""
    checkpoints = [resolve_checkpoint(Path(s)) for s in sources]
    steps = [read_marker(c).step for c in checkpoints]
    if len(set(steps)) != len(steps):
        raise CheckpointError(
            f"checkpoints {[str(c) for c in checkpoints]} include several of one step {steps}; "
            "merge candidates of one run, one per step."
        )
    return [c for _, c in sorted(zip(steps, checkpoints))]


def merge_window(candidates_dir: Path, config: WSMConfig, output: Path, checksums: bool = True) -> Path:
    """Merge the newest `config.num_candidates` complete candidates of `candidates_dir` with the
    config's weights. Raises CheckpointError if there are fewer, or they are not
    `config.interval_steps` apart."""
    found = complete_checkpoints(candidates_dir)[-config.num_candidates :]
    steps = [read_marker(c).step for c in found]
    if len(found) < config.num_candidates:
        raise CheckpointError(
            f"{candidates_dir} holds {len(found)} complete candidates (steps {steps}); the WSM "
            f"window needs {config.num_candidates}."
        )
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if gaps - {config.interval_steps}:
        raise CheckpointError(
            f"WSM candidates in {candidates_dir} are at steps {steps}, not "
            f"wsm.interval_steps={config.interval_steps} apart."
        )
    return merge_checkpoints(found, config_merge_weights(config), output, checksums)
