"""The eval phase: lm-eval's `local-completions` against the running server (GSM8K, as in the seed).

A local GSM8K-form JSONL (`question`/`answer` lines) replaces the hub download: the runner writes a
task definition into the run folder, adapted from the gsm8k task of the installed lm-eval (same
prompt, filters and metric), and asks lm-eval for that task instead of `gsm8k`.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from runner.commands import display, lm_eval_argv, lm_eval_prefix
from runner.config import EvalSpec, LaunchSpec
from runner.errors import ParseError, Problem, RunError
from runner.parsers import EvalScore, parse_lm_eval_json
from runner.server import ManagedProcess, supervise, tail

LOCAL_TASK = "gsm8k_local"
TASK_DIR = "eval_tasks"
OUTPUT_DIR = "eval"
LOG_NAME = "eval.log"
NOT_INSTALLED = "lm-eval is not installed; pip install 'servelab[eval]'"


# What lm-eval's API models (local-completions) import on top of lm-eval itself: its `api` extra.
API_PACKAGES = ("aiohttp", "tenacity", "requests", "tqdm")


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def missing_api_packages() -> list[str]:
    return [name for name in API_PACKAGES if importlib.util.find_spec(name) is None]


def installed_gsm8k_yaml() -> Path:
    """The gsm8k task definition shipped with the installed lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        raise RunError(NOT_INSTALLED)
    for root in spec.submodule_search_locations or []:
        path = Path(root) / "tasks" / "gsm8k" / "gsm8k.yaml"
        if path.is_file():
            return path
    raise RunError(
        "The installed lm-eval has no tasks/gsm8k/gsm8k.yaml to adapt for a local dataset; "
        "install lm-eval>=0.4.5 or clear the eval dataset path."
    )


def check_dataset(path: Path) -> int:
    """Number of questions in a GSM8K-form JSONL; RunError naming the first bad line otherwise."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RunError(f"Cannot read the eval dataset {path}: {exc.strerror}; give an existing JSONL file.") from None
    count = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise RunError(f"Eval dataset {path} line {number} is not JSON; write one JSON object per line.") from None
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("question", "answer")):
            raise RunError(
                f"Eval dataset {path} line {number} lacks a string `question` and `answer`; "
                'write GSM8K\'s form: {"question": "...", "answer": "...\\n#### 42"}.'
            )
        count += 1
    if not count:
        raise RunError(f"Eval dataset {path} holds no questions; write GSM8K-form JSONL lines.")
    return count


def local_eval_problem(spec: EvalSpec) -> Problem | None:
    """What stops an eval's local dataset, with the EvalSpec field it is about; None when nothing does
    (or there is no dataset path): tasks without gsm8k, an unreadable or malformed file, fewer questions
    than the few-shot examples (drawn from the other questions) need. The form says it before queueing,
    the eval phase refuses to start on it."""
    if not spec.dataset_path:
        return None
    try:
        local_tasks(spec.tasks)
        count = check_dataset(Path(spec.dataset_path).expanduser().resolve())
    except RunError as exc:
        return Problem(str(exc), "dataset_path")
    if spec.num_fewshot >= count:
        return Problem(f"Eval dataset {spec.dataset_path} has {count} questions, too few for {spec.num_fewshot}-shot "
                       f"prompts drawn from the other questions; use at most {count - 1} few-shot examples or add "
                       "questions.", "num_fewshot")
    return None


def local_task_config(dataset_path: Path) -> dict:
    """The installed gsm8k task, reading `dataset_path` instead of the hub's openai/gsm8k.

    Questions and few-shot examples come from the same file; lm-eval leaves a question out of its
    own few-shot examples when the two splits are the same.
    """
    installed = yaml.safe_load(installed_gsm8k_yaml().read_text())
    dropped = {"tag", "group", "task", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
               "validation_split", "test_split", "fewshot_split"}
    return {
        "task": LOCAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(dataset_path)}},
        "test_split": "test",
        "fewshot_split": "test",
        **{k: v for k, v in installed.items() if k not in dropped},
    }


def write_local_task(dataset_path: Path, task_dir: Path) -> Path:
    """Write the `gsm8k_local` task definition into `task_dir`; return its path."""
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / f"{LOCAL_TASK}.yaml"
    path.write_text(yaml.safe_dump(local_task_config(dataset_path), sort_keys=False, allow_unicode=True))
    return path


def local_tasks(tasks: str) -> str:
    """`tasks` with gsm8k replaced by the local task; the dataset path has nothing else to replace."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if "gsm8k" not in names:
        raise RunError(
            f"The eval dataset path replaces GSM8K, but the tasks are {tasks!r}; add gsm8k to the tasks "
            "or clear the dataset path."
        )
    return ",".join(LOCAL_TASK if t == "gsm8k" else t for t in names)


def find_results(output_path: Path, since: float | None = None) -> Path | None:
    """The newest `results_*.json` lm-eval wrote under `output_path` (at or after `since`, a time.time())."""
    found = [p for p in output_path.rglob("results_*.json") if p.is_file()]
    if since is not None:
        found = [p for p in found if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def run_eval(
    spec: EvalSpec,
    launch: LaunchSpec,
    base_url: str,
    run_dir: Path,
    env: dict[str, str],
    *,
    alive: Callable[[], bool] = lambda: True,
    cancelled: Callable[[], bool] = lambda: False,
    tick_s: float = 1.0,
    on_start: Callable[[list[str]], None] = lambda argv: None,
) -> tuple[list[EvalScore], str]:
    """Run lm-eval against the server at `base_url`; return its scores and the results JSON path.
    `on_start` receives lm-eval's argv just before it starts.

    The log goes to `run_dir/eval.log`, results under `run_dir/eval/`. Raises `RunError` when
    lm-eval is missing, fails or writes no results, or when the server exits meanwhile; `Cancelled`
    when `cancelled()` turns true (lm-eval's process group is stopped first).
    """
    if not lm_eval_installed():
        raise RunError(NOT_INSTALLED)
    if missing := missing_api_packages():
        raise RunError(
            f"lm-eval is installed without its API extra (missing {', '.join(missing)}), which local-completions "
            "needs; pip install 'servelab[eval]' or 'lm-eval[api]'"
        )
    run_dir = Path(run_dir)
    proc_env = {**env, "TOKENIZERS_PARALLELISM": "false"}
    include_path = None
    if spec.dataset_path:
        if problem := local_eval_problem(spec):
            raise RunError(problem)
        tasks, dataset = local_tasks(spec.tasks), Path(spec.dataset_path).expanduser().resolve()
        include_path = write_local_task(dataset, run_dir / TASK_DIR).parent
        spec = spec.model_copy(update={"tasks": tasks})
        proc_env["HF_DATASETS_OFFLINE"] = "1"  # a local file needs no hub; never let lm-eval reach for it
    output_path = run_dir / OUTPUT_DIR
    argv = lm_eval_argv(spec, launch, base_url, output_path, include_path=include_path, prefix=lm_eval_prefix())
    log_path = run_dir / LOG_NAME
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {display(argv)}\n")
    on_start(argv)
    proc = ManagedProcess(argv, proc_env, log_path)
    started = time.time()
    code = supervise(proc, "the evaluation", lambda: None if alive() else "", cancelled, lambda: tick_s)
    if code != 0:
        if not alive():
            raise RunError("vLLM server exited during the evaluation")
        lines = tail(log_path, 15)
        reason = next((line.strip() for line in reversed(lines.splitlines()) if line.strip()), "no output")
        raise RunError(f"lm-eval failed (exit {code}): {reason}\nlast lines of {log_path}:\n{lines}")
    results = find_results(output_path, since=started - 1)
    if results is None:
        raise RunError(f"lm-eval finished but wrote no results_*.json under {output_path}; see {log_path}.")
    try:
        scores = parse_lm_eval_json(results.read_text())
    except ParseError as exc:
        raise RunError(f"lm-eval results {results} unreadable: {exc}") from None
    if not scores:
        raise RunError(f"lm-eval results {results} hold no scores; see {log_path}.")
    return scores, str(results)
