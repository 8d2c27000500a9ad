"""Launch presets: the seed's two Kimi-K2-Thinking launches and the CPU demo. Pure: specs out."""

from __future__ import annotations

from pathlib import Path

from runner.config import BenchSpec, EvalSpec, LaunchSpec, RunSpec, Settings

SEED_MODEL = "moonshotai/Kimi-K2-Thinking"
CPU_DEMO = "CPU demo (tiny random Llama, vLLM CPU backend)"
TP8 = "TP8 — low latency (Kimi-K2-Thinking, 8 GPUs)"
TP8_DCP8 = "TP8+DCP8 — high throughput (Kimi-K2-Thinking, 8 GPUs)"


def demo_model_path(settings: Settings | None = None) -> Path:
    """Where the CPU demo model lives: `<data dir>/models/demo`, absolute so the worker finds it."""
    settings = settings or Settings.from_env()
    return (settings.data_dir / "models" / "demo").resolve()


def _seed_launch(dcp: int) -> LaunchSpec:
    # The recipe's launch line: tool calls and reasoning parsed with Kimi's own parsers.
    return LaunchSpec(
        model=SEED_MODEL, tensor_parallel_size=8, decode_context_parallel_size=dcp, trust_remote_code=True,
        tool_call_parser="kimi_k2", reasoning_parser="kimi_k2", extra_args=["--enable-auto-tool-choice"],
    )


SEED_BENCH = BenchSpec(dataset_name="random", random_input_len=8000, random_output_len=4000, request_rate=100,
                       num_prompts=1000)


def presets(settings: Settings | None = None) -> dict[str, RunSpec]:
    """Every preset by display name; the seed's runs keep the seed's eval settings (5-shot GSM8K)."""
    demo = LaunchSpec(model=str(demo_model_path(settings)), enforce_eager=True, max_model_len=2048)
    return {
        CPU_DEMO: RunSpec(
            label="CPU demo",
            launch=demo,
            # 4 s of load at a steady rate: long enough for the 1 Hz telemetry to show the benchmark
            bench=[BenchSpec(random_input_len=128, random_output_len=32, num_prompts=160, request_rate=40)],
        ),
        TP8: RunSpec(launch=_seed_launch(1), bench=[SEED_BENCH], eval=EvalSpec(num_fewshot=5)),
        TP8_DCP8: RunSpec(launch=_seed_launch(8), bench=[SEED_BENCH], eval=EvalSpec(num_fewshot=5, temperature=0.0)),
    }


def default_preset(gpu_count: int | None) -> str:
    """The preset a fresh dashboard opens with: the seed's TP8 on an 8-GPU machine, else the CPU demo."""
    return TP8 if gpu_count is not None and gpu_count >= 8 else CPU_DEMO


def is_missing_demo_model(model: str, settings: Settings | None = None) -> bool:
    """The demo model is written on first use, so its absence is not a problem before queueing."""
    path = demo_model_path(settings)
    return Path(model).expanduser().resolve() == path and not (path / "config.json").exists()
