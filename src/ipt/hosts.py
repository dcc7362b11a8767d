"""Which process this is among those that share a job: the rank variables a launcher sets
(torchrun's, or srun's when it starts the processes itself), for the engine's ranks and for
the data stages' hosts, which split a corpus's groups among themselves; and how those hosts
write the files they share."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ipt.config import ConfigError


def launcher_env() -> dict[str, int]:
    """Rank variables from torchrun, or from SLURM when started by `srun` directly."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        return {"rank": int(env["RANK"]), "world": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0)), "local_world": local_world}
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {"rank": int(env["SLURM_PROCID"]), "world": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0)),
                "local_world": int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])}
    return {"rank": 0, "world": 1, "local_rank": 0, "local_world": 1}


def worker_share(index: int | None, count: int | None) -> tuple[int, int]:
    """(index, count) of this process among the hosts splitting a stage's groups (group k
    goes to worker k % count); None takes them from the launcher's rank variables."""
    env = launcher_env()
    index = index if index is not None else env["rank"]
    count = count if count is not None else env["world"]
    if not 0 <= index < count:
        raise ConfigError(f"worker_index={index} must be in [0, num_workers={count})")
    return index, count


def publish(path: Path, text: str, once: bool = False) -> bool:
    """Write `path` whole or not at all, from a temporary name of this writer's own (several
    hosts may write at once); with `once`, only if no writer has yet. Whether it wrote."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        if not once:
            tmp.replace(path)
            return True
        try:
            os.link(tmp, path)  # fails if the file is there: the first writer wins
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
