"""The training run: the recipe's stages in order, each resumable, each ending in a WSM merge.

Stage `s` starts from the merged model of the stage before it (the first from `init_from` or
random init), trains at constant LR after warmup, saves weights-only WSM candidates over its
last window, and merges them into `<save_dir>/wsm/<s>/merged`. A stage whose merged model is
complete is done; a run restarted at any moment resumes the first stage that is not, from its
latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf

from ring_train.checkpoint.layout import is_complete, wsm_candidates_dir, wsm_merged_path
from ring_train.checkpoint.trainer_state import TrainerState
from ring_train.checkpoint.training_checkpoint import (
    checkpoint_to_resume,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from ring_train.checkpoint.wsm import merge_window
from ring_train.config.errors import ConfigError
from ring_train.config.model import ModelConfig
from ring_train.config.schema import StageConfig, TrainConfig
from ring_train.data.stream import BatchLayout, DataStreams, build_streams
from ring_train.data.tokenizers import Tokenizer, check_vocab, load_tokenizer
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import (
    init_distributed,
    join_process_group,
    pipeline_comm_kwargs,
    validate_layout,
)
from ring_train.training.flops import device_peak_tflops, flops_per_token
from ring_train.training.lr_schedule import warmup_constant_schedule
from ring_train.training.metrics import MetricsLogger, format_duration, memory_gib
from ring_train.training.preemption import Preempted, PreemptionWatch
from ring_train.training.setup import (
    build_model_chunks,
    build_optimizer,
    uses_distributed_optimizer,
    wrap_ddp,
)
from ring_train.training.step import evaluate, train_step

logger = logging.getLogger("ring_train")


def stage_model_config(cfg: TrainConfig, stage: StageConfig) -> ModelConfig:
    """The model of a stage: the recipe's, with the stage's RoPE base and expert-bias rate."""
    overrides = {}
    if stage.rope_theta is not None:
        overrides["rope_theta"] = stage.rope_theta
    if stage.router_bias_update_rate is not None:
        overrides["router_bias_update_rate"] = stage.router_bias_update_rate
    return dataclasses.replace(cfg.model, **overrides)


@dataclass
class StagePlan:
    name: str
    stage: StageConfig
    # Weights the stage starts from when it has no checkpoint of its own.
    init_weights: Optional[Path]
    save_dir: Path
    merged: Path


def plan_stages(cfg: TrainConfig) -> List[StagePlan]:
    """Every stage of the recipe with where it starts from and where it saves."""
    root = Path(cfg.checkpoint.save_dir)
    plans, previous = [], Path(cfg.init_from) if cfg.init_from else None
    for name, stage in cfg.stages.items():
        merged = wsm_merged_path(root, name)
        plans.append(StagePlan(name, stage, previous, root / "stages" / name, merged))
        previous = merged
    return plans


class StageRun:
    """Model, optimizer, schedule and data of one stage on this process."""

    def __init__(self, cfg: TrainConfig, plan: StagePlan, tokenizer: Tokenizer, metrics: MetricsLogger):
        self.cfg, self.plan, self.stage, self.metrics = cfg, plan, plan.stage, metrics
        parallel = self.stage.parallel or cfg.parallel
        init_distributed(
            tensor_parallel=parallel.tensor_parallel,
            pipeline_parallel=parallel.pipeline_parallel,
            virtual_pipeline_parallel=parallel.virtual_pipeline_parallel,
            expert_parallel=parallel.expert_parallel,
            expert_tensor_parallel=parallel.expert_tensor_parallel,
            context_parallel=parallel.context_parallel,
            seed=cfg.seed,
        )
        self.model_cfg = stage_model_config(cfg, self.stage)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.config = to_transformer_config(
            self.model_cfg, parallel, params_dtype=dtype, compute=cfg.compute,
            **pipeline_comm_kwargs()
        )
        chunks = build_model_chunks(self.model_cfg, self.config)
        self.resume_from = checkpoint_to_resume(
            dataclasses.replace(cfg.checkpoint, save_dir=str(plan.save_dir),
                                load=self._load_request())
        )
        if self.resume_from is None and plan.init_weights is not None:
            # Before the optimizer is built: bf16 runs copy fp32 main weights from the model.
            load_weights(plan.init_weights, chunks, cfg.checkpoint.verify_checksums)
        distributed_optimizer = uses_distributed_optimizer(cfg.optim)
        self.model = wrap_ddp(chunks, self.config, distributed_optimizer)
        optim = dataclasses.replace(cfg.optim, lr=self.stage.lr, warmup_steps=self.stage.warmup_steps)
        self.optimizer = build_optimizer(self.model, optim, self.config, distributed_optimizer)
        self.total_steps = self.stage.steps()
        self.scheduler = warmup_constant_schedule(
            self.optimizer, self.stage.lr, self.stage.warmup_steps, self.total_steps,
            cfg.optim.weight_decay,
        )
        dp_size = parallel_state.get_data_parallel_world_size()
        layout = BatchLayout(
            self.stage.seq_length, self.stage.global_batch_size, self.stage.micro_batch_size,
            parallel_state.get_data_parallel_rank(), dp_size,
        )
        eval_samples = self.stage.eval_microbatches * self.stage.micro_batch_size * dp_size
        self.data: DataStreams = build_streams(
            self.stage.data or cfg.data, tokenizer, layout, self.total_steps, eval_samples,
            stage=plan.name,
        )
        self.state = TrainerState(step=0, stage=plan.name)
        if self.resume_from is not None:
            self.state = load_checkpoint(self.resume_from, self.model, self.optimizer,
                                         cfg.checkpoint.verify_checksums)
            self.scheduler.load_state_dict(self.state.lr_scheduler)
            self.data.train.load_state_dict(self.state.data_loader)
        self.candidate_steps = set(self.stage.wsm.candidate_steps(self.total_steps))
        self.flops_per_token = flops_per_token(self.model_cfg, self.stage.seq_length)
        self.peak_tflops = device_peak_tflops(cfg.logging.peak_tflops)

    def _load_request(self) -> Optional[str]:
        """An explicit checkpoint.load path applies to the first stage this launch runs."""
        load = self.cfg.checkpoint.load
        first = self.cfg.stage or next(iter(self.cfg.stages))
        if load not in (None, "latest") and self.plan.name != first:
            return "latest"
        return load

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, watch: PreemptionWatch) -> None:
        if self.state.stage_step == 0:
            self._log_eval("eval_loss_initial")
        tokens_per_step = self.stage.global_batch_size * self.stage.seq_length
        start, started_at = self.state.stage_step, time.monotonic()
        for microbatches in self.data.train:
            step_started = time.monotonic()
            result = train_step(self.model, self.optimizer, microbatches)
            self.scheduler.step(1)
            self.state.step += 1
            self.state.stage_step += 1
            self.state.consumed_samples += self.stage.global_batch_size
            self.state.consumed_tokens += tokens_per_step
            step_time = time.monotonic() - step_started
            if self.state.stage_step % self.cfg.logging.log_interval == 0:
                elapsed = time.monotonic() - started_at
                eta = elapsed / (self.state.stage_step - start) * (self.total_steps - self.state.stage_step)
                self._log_step(result, tokens_per_step / step_time, eta)
            if self.state.stage_step in self.candidate_steps:
                save_weights(wsm_candidates_dir(Path(self.cfg.checkpoint.save_dir), self.plan.name),
                             self.state.stage_step, self.model,
                             keep_last=self.stage.wsm.num_candidates,
                             checksums=self.cfg.checkpoint.verify_checksums)
            interval = self.cfg.checkpoint.save_interval
            last = self.state.stage_step == self.total_steps
            if last or (interval and self.state.stage_step % interval == 0):
                self.save()
            elif watch.should_stop():
                self.save()
                raise Preempted(self.state.step)
        self.merge_and_evaluate()

    def save(self) -> None:
        self.state.lr_scheduler = self.scheduler.state_dict()
        self.state.data_loader = self.data.train.state_dict()
        self.state.config = self.metrics.run_config
        save_checkpoint(self.plan.save_dir, self.model, self.optimizer, self.state,
                        self.cfg.checkpoint.keep_last, self.cfg.checkpoint.verify_checksums)

    def merge_and_evaluate(self) -> None:
        candidates = wsm_candidates_dir(Path(self.cfg.checkpoint.save_dir), self.plan.name)
        if dist.get_rank() == 0 and not is_complete(self.plan.merged):
            merge_window(candidates, self.stage.wsm, self.plan.merged,
                         self.cfg.checkpoint.verify_checksums)
        dist.barrier()
        load_weights(self.plan.merged, self.model, self.cfg.checkpoint.verify_checksums)
        self._log_eval("eval_loss_merged")

    # ---- logging -----------------------------------------------------------------------------

    def _log_eval(self, key: str) -> None:
        if self.data.validation is None:
            return
        loss, tokens = evaluate(self.model, self.data.validation.microbatches())
        self.metrics.log(
            {"stage": self.plan.name, "global_step": self.state.step, key: loss, "eval_tokens": tokens},
            console=f"[{self.plan.name}] step {self.state.stage_step}: {key} {loss:.4f} "
                    f"over {tokens} tokens",
        )

    def _log_step(self, result, tokens_per_second: float, eta_seconds: float) -> None:
        world = dist.get_world_size()
        mfu = None
        if self.peak_tflops:
            mfu = tokens_per_second * self.flops_per_token / (world * self.peak_tflops * 1e12)
        lr = self.scheduler.get_lr(self.optimizer.param_groups[0])
        record = {
            "stage": self.plan.name, "global_step": self.state.step,
            "stage_step": self.state.stage_step, "loss": result.loss, "lr": lr,
            "grad_norm": result.grad_norm, "tokens_per_second": tokens_per_second,
            "tokens_per_second_per_device": tokens_per_second / world, "mfu": mfu,
            "memory_gib": memory_gib(), "consumed_tokens": self.state.consumed_tokens,
            "skipped": not result.update_successful,
        }
        grad_norm = "-" if result.grad_norm is None else f"{result.grad_norm:.3f}"
        self.metrics.log(record, console=(
            f"[{self.plan.name}] step {self.state.stage_step}/{self.total_steps} | loss "
            f"{result.loss:.4f} | lr {lr:.3g} | grad norm {grad_norm} | "
            f"{tokens_per_second:,.0f} tok/s | MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}"
            f" | mem {record['memory_gib']:.2f} GiB | ETA {format_duration(eta_seconds)}"
        ))

    def close(self) -> None:
        parallel_state.destroy_model_parallel()


RUN_CONFIG_FILE = "config.yaml"


def check_same_model(output_dir: Path, run_config: dict) -> None:
    """Refuses to continue a run directory that was trained with another model: its stages'
    checkpoints and merged models would be reused as if they were this model's."""
    path = output_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return
    recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("model", {})
    changed = {k: (recorded.get(k), v) for k, v in run_config["model"].items() if recorded.get(k) != v}
    if changed:
        described = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"output_dir={output_dir} holds a run of another model ({described}); choose a new "
            f"output_dir, or set the model back."
        )


def record_run_config(output_dir: Path, run_config: dict) -> None:
    """Writes the resolved config next to the run's outputs (rank 0), atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (RUN_CONFIG_FILE + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(run_config)))
    os.replace(tmp, output_dir / RUN_CONFIG_FILE)


def check_world_size(cfg: TrainConfig, world_size: int) -> None:
    """Every stage's layout must tile the job: checked before anything is written."""
    for name, stage in cfg.stages.items():
        p = stage.parallel or cfg.parallel
        try:
            validate_layout(world_size, p.tensor_parallel, p.pipeline_parallel,
                            p.virtual_pipeline_parallel, p.expert_parallel,
                            p.expert_tensor_parallel_size, p.context_parallel)
        except ValueError as error:
            raise ConfigError(f"stage {name}: {error}") from error


def train(cfg: TrainConfig, run_config: dict) -> None:
    """Runs the recipe's stages (or `cfg.stage` only) on this process; all ranks call it."""
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    check_vocab(tokenizer, cfg.model.vocab_size)
    check_same_model(Path(cfg.output_dir), run_config)
    plans = plan_stages(cfg)
    if cfg.stage is not None:
        plans = [p for p in plans if p.name == cfg.stage]
        if plans[0].init_weights is not None and not is_complete(plans[0].init_weights):
            raise ConfigError(
                f"stage={cfg.stage} starts from {plans[0].init_weights}, which does not hold a "
                f"complete checkpoint: run the stage before it first."
            )
    metrics = None
    try:
        with PreemptionWatch() as watch:
            for plan in plans:
                if is_complete(plan.merged):
                    logger.info("[%s] done: its merged model is %s", plan.name, plan.merged)
                    continue
                if metrics is None:
                    join_process_group()
                    check_world_size(cfg, dist.get_world_size())
                    if dist.get_rank() == 0:
                        record_run_config(Path(cfg.output_dir), run_config)
                    metrics = MetricsLogger(cfg.logging, Path(cfg.output_dir), run_config,
                                            active=dist.get_rank() == 0)
                run = StageRun(cfg, plan, tokenizer, metrics)
                try:
                    run.run(watch)
                finally:
                    run.close()
    finally:
        if metrics is not None:
            metrics.close()
