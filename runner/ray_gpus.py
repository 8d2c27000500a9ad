"""The GPU ids Ray gave the task that calls this: how the Ray worker learns which GPUs of a node a run's placement
group holds (its executor runs in a long-lived actor that holds none). A module of its own that imports nothing
of the runner, so that the Ray worker process running it starts it in milliseconds (one process per node, reused).
"""


def held_gpu_ids() -> list[int]:
    import ray

    return [int(g) for g in ray.get_gpu_ids()]
