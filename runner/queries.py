"""Small additions to `runner.api` that the dashboard needs; plain arguments in, values out."""

from __future__ import annotations

from runner.config import LaunchSpec
from runner.errors import SpecError, StoreError
from runner.models import Run, RunSource
from runner.store import Store


def describe_imported(
    store: Store,
    run_ids: list[int],
    model: str | None = None,
    tensor_parallel_size: int | None = None,
    decode_context_parallel_size: int | None = None,
) -> list[Run]:
    """Record the configuration of imported results, which the files themselves rarely state
    (a printed bench block names no TP size), so tables, labels and per-GPU charts can use it.

    Only imported runs can be described: a launched run's configuration is what it ran with.
    """
    tp, dcp = tensor_parallel_size, decode_context_parallel_size
    if dcp is not None and tp is None:
        raise SpecError("A DCP size needs the TP size it divides; give the TP size too.")
    fields: dict[str, object] = {}
    if model:
        fields["model"] = model.strip()
    if tp is not None:
        check = LaunchSpec.parse({"model": "imported", "tensor_parallel_size": tp,
                                  "decode_context_parallel_size": dcp or 1})
        if problems := check.problems():
            raise SpecError(problems)
        fields.update(tensor_parallel_size=tp, decode_context_parallel_size=dcp or 1)
    runs = [store.get_run(r) for r in run_ids]
    for run in runs:
        if run.source != RunSource.imported:
            raise StoreError(f"run {run.id} was launched here; its configuration is the one it ran with")
    return [store.update_run(run.id, **fields) for run in runs] if fields else runs
