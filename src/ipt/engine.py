"""Process setup and the DeepSpeed engine: the only file that knows about ranks and ZeRO.

The same code runs as one plain process (no launcher), under `torchrun`, and under `srun`:
`init_distributed` reads whichever environment is there and starts `torch.distributed`
(gloo on CPU, nccl on GPU) through DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ipt import quiet
from ipt.config import PretrainConfig
from ipt.health import SkippableAdamW
from ipt.hosts import launcher_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_resolvable(host: str, source: str) -> None:
    """Fail at once, naming `source`, when the rendezvous host does not resolve: otherwise
    every rank retries its connection until the rendezvous or collective timeout."""
    from ipt.config import ConfigError

    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise ConfigError(f"the rendezvous address {host!r} ({source}) does not resolve "
                          f"({e.strerror or e}): set it to a host name or IP address every "
                          "node can reach, such as the first node's") from e


def slurm_rendezvous() -> dict[str, str]:
    """MASTER_ADDR/PORT of a SLURM job: the address SLURM has for the allocation's first node
    (its NodeAddr, which need not be its name), and a port from the job id (MASTER_PORT, if
    set, wins). For ranks started by `srun` itself, and for launch/slurm.sbatch
    (`python -m ipt.engine rendezvous`): the formula is written here only."""
    import subprocess

    env = os.environ

    def scontrol(*args: str) -> str:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True,
                              check=True).stdout

    first = scontrol("show", "hostnames", env["SLURM_JOB_NODELIST"]).split()[0]
    try:
        fields = dict(f.split("=", 1) for f in scontrol("show", "node", "-o", first).split()
                      if "=" in f)
    except subprocess.CalledProcessError:  # no node record to read: its name must do
        fields = {}
    return {"MASTER_ADDR": fields.get("NodeAddr") or first,
            "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))}


def set_threads(threads_per_rank: int, local_world_size: int) -> int:
    """Pin intra-op threads per rank: on CPU, oversubscription costs more than it gives."""
    n = threads_per_rank or max(1, (os.cpu_count() or 1) // local_world_size)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def skip_shared_memory_op() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce op when it starts (about a minute
    on a machine's first run, under a torch build lock that a run killed meanwhile leaves
    behind, and that every later start then waits on). Only DeepSpeed's inference all-reduce
    uses the op; training reduces through torch.distributed. So it is marked unavailable,
    as on a machine that cannot build it, and never compiled."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(threads_per_rank: int = 0, timeout_s: float = 0.0) -> Dist:
    """Start torch.distributed; `timeout_s` (if > 0) bounds how long a collective may wait."""
    from datetime import timedelta

    import deepspeed

    e = launcher_env()
    if e["world"] > 1 and "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        os.environ.update(slurm_rendezvous())
    if e["world"] == 1 and "MASTER_ADDR" not in os.environ:
        # A plain process: give torch.distributed a private single-rank rendezvous.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if e["world"] > 1 and "MASTER_ADDR" in os.environ:
        check_resolvable(os.environ["MASTER_ADDR"], "MASTER_ADDR")
    os.environ.update(RANK=str(e["rank"]), WORLD_SIZE=str(e["world"]),
                      LOCAL_RANK=str(e["local_rank"]))
    set_threads(threads_per_rank, e["local_world"])
    if torch.cuda.is_available():
        if e["local_rank"] >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {e['local_rank']} needs GPU {e['local_rank']} but "
                               f"this node has {torch.cuda.device_count()}; start fewer ranks "
                               "per node")
        torch.cuda.set_device(e["local_rank"])
        device, backend = torch.device("cuda", e["local_rank"]), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        if device.type == "cpu":
            skip_shared_memory_op()
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s > 0 else {}
        with quiet.prints_to_log(log):  # DeepSpeed prints as it starts
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)
    return Dist(e["rank"], e["world"], e["local_rank"], e["local_world"], device)


def deepspeed_config(cfg: PretrainConfig, grad_accum: int) -> dict[str, Any]:
    """Render the `deepspeed` config group into the dict `deepspeed.initialize` takes."""
    ds, t = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": ds.overlap_comm,
                            "reduce_bucket_size": ds.reduce_bucket_size,
                            "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        if ds.stage != 3:
            from ipt.config import ConfigError
            raise ConfigError("deepspeed.offload_param needs deepspeed.stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": deepspeed_clip(cfg),
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # the optimizer is torch's AdamW: the same one a bare PyTorch loop uses
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.device_skip:
        # bf16 under ZeRO-1/2: the overflow check's `.item()` (the optimizer skips instead)
        out["bf16"]["check_grad_overflow"] = False
    return _merge(out, dict(ds.extra))


def deepspeed_clip(cfg: PretrainConfig) -> float:
    """DeepSpeed's `gradient_clipping`: none with `optim.device_skip`, where the optimizer
    clips (DeepSpeed's ZeRO-1/2 clipping reads the norm on the host, once per group)."""
    return 0.0 if cfg.optim.device_skip else cfg.optim.grad_clip


def check_optimizer(cfg: PretrainConfig) -> None:
    """Refuse `optim.fused` where torch has no fused AdamW for the optimizer's device, and
    `optim.device_skip` without it, before anything is built."""
    from ipt.config import ConfigError

    o = cfg.optim
    if o.device_skip and not o.fused:
        raise ConfigError("optim.device_skip=true needs optim.fused=true: only fused AdamW "
                          "can skip a step on the device (found_inf)")
    if not o.fused:
        return
    offloaded = cfg.deepspeed.offload_optimizer
    device = torch.device("cuda" if torch.cuda.is_available() and not offloaded else "cpu")
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.zeros_like(p)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except RuntimeError as e:
        raise ConfigError(f"optim.fused=true, but torch {torch.__version__} has no fused "
                          f"AdamW for the optimizer's device ({device}: {e}); set "
                          "optim.fused=false") from e


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) else v
    return base


def build_engine(model: torch.nn.Module, cfg: PretrainConfig, grad_accum: int, lr_lambda) -> Any:
    """Wrap the model in a DeepSpeed engine with AdamW and the lr schedule."""
    import deepspeed

    check_optimizer(cfg)
    o = cfg.optim
    # matrices decay, vectors do not; a ZeRO-3 partition (a model loaded partitioned) is flat,
    # and its own shape is `ds_shape`
    def matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if matrix(p)]
    no_decay = [p for p in model.parameters() if not matrix(p)]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = SkippableAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                               fused=o.fused, foreach=not o.fused,
                               device_skip=o.device_skip,
                               clip=o.grad_clip if o.device_skip else 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, grad_accum))
    wrapper = engine.optimizer
    if o.device_skip and wrapper is not optimizer:
        # set by every DeepSpeed wrapper before it calls the optimizer: the step's norm
        optimizer.norm_source = lambda: wrapper._global_grad_norm
    _keep_settings_after_loads(engine, optimizer, deepspeed_clip(cfg))
    return engine


def _keep_settings_after_loads(engine: Any, optimizer: SkippableAdamW, clip: float) -> None:
    """After each checkpoint load, the run's own clipping and AdamW kernel, not the saved
    run's: DeepSpeed's ZeRO-1/2 (and BF16) optimizer restores the `clip_grad` it was saved
    with, and torch's load the groups' `fused`/`foreach` (`SkippableAdamW.restore_
    implementation`). Without this, resuming across `optim.device_skip` would clip twice or
    not at all, and a changed `optim.grad_clip` or `optim.fused` would be ignored."""
    load = engine.load_checkpoint

    def load_keeping_settings(*args: Any, **kwargs: Any) -> Any:
        out = load(*args, **kwargs)
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = clip
        optimizer.restore_implementation()
        return out

    engine.load_checkpoint = load_keeping_settings


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["rendezvous"]:
        sys.exit("usage: python -m ipt.engine rendezvous  (inside a SLURM job)")
    print(" ".join(f"{k}={v}" for k, v in slurm_rendezvous().items()))
