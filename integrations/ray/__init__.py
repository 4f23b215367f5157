"""FFN workers as Ray actors: one actor per FFN rank, started, checked and stopped together.

    with FFNWorkerPool(deployment, model_path, deployment.create_windows()) as pool:
        ...  # attention ranks send; the actors serve

With no `ray_address` in the config a local Ray is started (the embedded default); with
one, the actors join that cluster. Ray's token authentication stays as Ray configures it.
"""

from afd_dispatch.integrations.ray.ffn_actor import FFNWorkerActor
from afd_dispatch.integrations.ray.pool import FFNWorkerPool, ensure_ray

__all__ = ["FFNWorkerActor", "FFNWorkerPool", "ensure_ray"]
