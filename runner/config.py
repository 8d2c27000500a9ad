"""Specs: what to launch, how to benchmark it, how to evaluate it, and sweeps over them.

One source of truth for configuration: the launch form, the CLI help and the README table are all
generated from these pydantic models. Field names follow vLLM's flag names; files may use dashes or
underscores (`tensor-parallel-size` or `tensor_parallel_size`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runner.errors import Problem, SpecError
from runner.loads import expand_load_lists

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Upper bounds that keep a typo from becoming a benchmark that runs for days or a launch vLLM refuses late.
MAX_PROMPTS = 1_000_000
MAX_SEQS = 65_536
MAX_TOKENS = 16_777_216  # 16 Mi tokens: above every context length a model declares today


def _underscore_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}
    return data


class _Spec(BaseModel):
    # inf request rates survive a JSON round trip as "Infinity" (pydantic's default writes null)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="strings")

    @model_validator(mode="before")
    @classmethod
    def _dashes(cls, data: Any) -> Any:
        return _underscore_keys(data)

    @classmethod
    def parse(cls, data: dict[str, Any]):
        """Validate `data`, turning pydantic's errors into one `SpecError` that names value and fix."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(describe_validation_error(exc, cls.__name__)) from None

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + name.replace("_", "-")


def describe_validation_error(exc: ValidationError, where: str) -> list[Problem]:
    """pydantic's errors in plain words, each naming the field as vLLM's flag, the value and the fix."""
    return [_plain(err, where) for err in exc.errors()]


def _number(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, int) or v.is_integer():
        return f"{int(v):,}" if abs(v) >= 100_000 else str(int(v))  # 1,000,000 prompts; port 65535
    return f"{v:g}"


def _plain(err: Any, where: str) -> Problem:
    loc = [p for p in err["loc"] if isinstance(p, str)]
    index = next((p for p in err["loc"] if isinstance(p, int)), None)
    field = ".".join(loc) or None
    flag = loc[-1].replace("_", "-") if loc else where
    if index:  # the second benchmark onwards: say which
        flag += f" (benchmark {index + 1})"
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return Problem(f"Unknown key `{'.'.join(map(str, err['loc']))}` in {where}; check the spelling against "
                       "`servelab fields`.", None)
    if kind == "missing":
        return Problem(f"{flag} is required in {where}; add it.", field)
    if kind == "value_error":  # our validators' messages are already written for a person
        return Problem(str(ctx.get("error", err["msg"])), field)
    lo, hi = _bounds(field)
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than") and lo is not None \
            and hi is not None:
        return Problem(f"{flag} must be between {_number(lo)} and {_number(hi)}; it is {_number(value)}.", field)
    if kind in ("greater_than_equal", "greater_than"):
        word = "at least" if kind == "greater_than_equal" else "above"
        bound = ctx.get("ge", ctx.get("gt"))
        return Problem(f"{flag} must be {word} {_number(bound)}; it is {_number(value)}.", field)
    if kind in ("less_than_equal", "less_than"):
        word = "at most" if kind == "less_than_equal" else "below"
        bound = ctx.get("le", ctx.get("lt"))
        return Problem(f"{flag} must be {word} {_number(bound)}; it is {_number(value)}.", field)
    if kind.startswith("int_") or kind == "int_from_float":
        return Problem(f"{flag} must be a whole number; {value!r} is not.", field)
    if kind.startswith("float_"):
        return Problem(f"{flag} must be a number (or inf where allowed); {value!r} is not.", field)
    if kind.startswith("bool_"):
        return Problem(f"{flag} must be true or false; {value!r} is not.", field)
    if kind == "literal_error":
        return Problem(f"{flag} must be one of {ctx.get('expected', '')}; {value!r} is not.", field)
    return Problem(f"{flag} {value!r}: {err['msg']}.", field)


def _bounds(field: str | None) -> tuple[float | None, float | None]:
    """(ge, le) of a spec field named `launch.port`, `bench.num_prompts` or `port`."""
    if not field:
        return None, None
    section, _, name = field.rpartition(".")
    models: dict[str, type[BaseModel]] = {"launch": LaunchSpec, "bench": BenchSpec, "eval": EvalSpec}
    for model in ([models[section]] if section in models else models.values()):
        if name in model.model_fields:
            lo = hi = None
            for m in model.model_fields[name].metadata:
                lo = getattr(m, "ge", lo)
                hi = getattr(m, "le", hi)
            return lo, hi
    return None, None


CPU_DCP = ("vLLM's CPU backend cannot run decode context parallel: its attention does not return the softmax LSE "
           "that DCP merges; DCP needs a GPU backend.")


@dataclass(frozen=True)
class Host:
    """The machine a launch would run on: its GPUs, or on vLLM's CPU backend its cores (one per rank)."""

    gpus: int = 0
    cpu_backend: bool = False
    cores: int = 1

    @property
    def ranks(self) -> int:
        """How many TP×PP×DP ranks fit at once."""
        return self.cores if self.cpu_backend else self.gpus

    def problems(self, launch: LaunchSpec) -> list[Problem]:
        """What keeps `launch` from running on this machine, whatever the model."""
        out = []
        if self.cpu_backend and launch.decode_context_parallel_size > 1:
            out.append(Problem(CPU_DCP, "decode_context_parallel_size"))
        if launch.gpus_needed > self.ranks:
            sizes = (f"TP×PP×DP = {launch.tensor_parallel_size}×{launch.pipeline_parallel_size}×"
                     f"{launch.data_parallel_size} = {launch.gpus_needed}")
            here = (f"this machine has no GPU and vLLM's CPU backend runs one rank per core on its {self.cores} "
                    f"core{'s' if self.cores != 1 else ''}" if self.cpu_backend
                    else f"this machine has {self.gpus} GPU{'s' if self.gpus != 1 else ''}")
            out.append(Problem(f"{sizes} ranks, but {here}; lower the sizes to fit {self.ranks}, or queue it for a "
                               f"worker on a machine with {launch.gpus_needed} GPUs.", "tensor_parallel_size"))
        return out


@dataclass(frozen=True)
class ClusterShape:
    """A Ray cluster as launches see it: the GPUs each alive node declares. A launch that fits one node runs
    there; one that needs more runs across whole nodes of the largest size (vLLM's Ray executor, one GPU per
    rank); anything else is refused with the shape. `cpu_backend`: the nodes run vLLM's CPU build (no DCP)."""

    node_gpus: tuple[int, ...]
    cpu_backend: bool = False

    @property
    def node_size(self) -> int:
        """GPUs of the largest node: what a single-node launch can have, and the size of a multi-node one's nodes."""
        return max(self.node_gpus, default=0)

    @property
    def full_nodes(self) -> int:
        """How many nodes have `node_size` GPUs."""
        return sum(1 for g in self.node_gpus if g == self.node_size) if self.node_size else 0

    def describe(self) -> str:
        """`2 nodes × 8 GPUs`, `1 node × 8 GPUs + 2 nodes × 4 GPUs`, `no node with a GPU`."""
        sizes = sorted({g for g in self.node_gpus if g}, reverse=True)
        if not sizes:
            return f"{len(self.node_gpus)} node{'s' if len(self.node_gpus) != 1 else ''} and no GPU"
        parts = []
        for size in sizes:
            n = self.node_gpus.count(size)
            parts.append(f"{n} node{'s' if n != 1 else ''} × {size} GPU{'s' if size != 1 else ''}")
        return " + ".join(parts)

    def nodes_for(self, launch: LaunchSpec) -> int | None:
        """How many nodes `launch` takes here (1: single-node), or None when it cannot fit."""
        need, size = launch.gpus_needed, self.node_size
        if size and need <= size:
            return 1
        if size and need % size == 0 and need // size <= self.full_nodes:
            return need // size
        return None

    def problems(self, launch: LaunchSpec) -> list[Problem]:
        """What keeps `launch` from running on this cluster, whatever the model."""
        out = []
        if self.cpu_backend and launch.decode_context_parallel_size > 1:
            out.append(Problem(CPU_DCP, "decode_context_parallel_size"))
        if self.nodes_for(launch) is None:
            need, size, sizes = launch.gpus_needed, self.node_size, _sizes_text(launch)
            if not size:
                why = f"{sizes} needs {need} GPUs: add GPU nodes (`ray start --address … --num-gpus N`)"
            elif need % size:
                whole = ", ".join(str(size * k) for k in range(1, self.full_nodes + 1))
                why = (f"{sizes} needs {need} GPUs, and a launch larger than one node takes whole {size}-GPU nodes: "
                       f"pick sizes whose product is one of {whole}")
            else:
                why = (f"{sizes} needs {need // size} such nodes: add nodes or lower the sizes to fit "
                       f"{size * self.full_nodes} GPUs")
            out.append(Problem(f"The Ray cluster has {self.describe()}; {why}.", "tensor_parallel_size"))
        return out


Target = Host | ClusterShape
"""What a launch is checked against: one machine, or the Ray cluster a Ray worker schedules onto."""


def _sizes_text(launch: LaunchSpec) -> str:
    """`TP 32`, or `TP×PP×DP = 8×4×1`."""
    tp, pp, dp = launch.tensor_parallel_size, launch.pipeline_parallel_size, launch.data_parallel_size
    return f"TP {tp}" if pp == dp == 1 else f"TP×PP×DP = {tp}×{pp}×{dp}"


def gpus_for(tp: int, pp: int = 1, dp: int = 1) -> int:
    """GPUs (CPU ranks on the CPU backend) a launch takes: TP × PP × DP."""
    return tp * pp * dp


def parallel_label(tp: int, dcp: int = 1, pp: int = 1, dp: int = 1, ep: bool = False) -> str:
    """`TP8`, `TP8+DCP8`, `TP4+PP2`, `TP8+EP` — the name the seed uses for a configuration."""
    parts = [f"TP{tp}", *(f"{tag}{size}" for size, tag in ((dcp, "DCP"), (pp, "PP"), (dp, "DP")) if size > 1)]
    return "+".join(parts + (["EP"] if ep else []))


class LaunchSpec(_Spec):
    """How to start `vllm serve`. Every field maps to the vLLM flag of the same name."""

    model: str = Field(description="Model: a Hugging Face id or a local folder with config.json.")
    served_model_name: str | None = Field(None, description="Name the API serves the model under.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Tensor-parallel size (GPUs per replica stage).")
    decode_context_parallel_size: int = Field(
        1, ge=1, le=64, description="Decode-context-parallel size; must divide the tensor-parallel size."
    )
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="Pipeline-parallel size.")
    data_parallel_size: int = Field(1, ge=1, le=64, description="Data-parallel size (replicas).")
    enable_expert_parallel: bool = Field(False, description="Use expert parallelism for MoE layers.")
    max_model_len: int | None = Field(
        None, ge=16, le=MAX_TOKENS, description="Maximum context length (prompt + output).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of GPU memory vLLM may use (0–1)."
    )
    max_num_seqs: int | None = Field(None, ge=1, le=MAX_SEQS, description="Maximum sequences per batch.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Maximum tokens per batch step.")
    kv_cache_dtype: str | None = Field(None, description="KV-cache data type (auto, fp8, fp8_e4m3, …).")
    dtype: str | None = Field(None, description="Model weight/activation data type (auto, bfloat16, float16, …).")
    load_format: str | None = Field(None, description="Weight loading format (auto, safetensors, dummy, …).")
    trust_remote_code: bool = Field(False, description="Allow the model's own Python code from its repository.")
    reasoning_parser: str | None = Field(None, description="Reasoning parser (e.g. kimi_k2, deepseek_r1).")
    tool_call_parser: str | None = Field(None, description="Tool-call parser (e.g. kimi_k2, hermes).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation (faster start).")
    host: str = Field("127.0.0.1", description="Address the server binds to.")
    port: int = Field(8000, ge=1024, le=65535, description="Port the server listens on (1024–65535).")
    extra_args: list[str] = Field(
        default_factory=list, description="More `vllm serve` arguments, passed verbatim as argv items."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for the server.")

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("Model: enter a model name (a Hugging Face id such as org/name) or a local path.")
        return v.strip()

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not valid; use letters, digits and _")
            if "\x00" in str(value):
                raise ValueError(f"environment variable {name} contains a NUL byte")
        return {k: str(val) for k, val in v.items()}

    @field_validator("extra_args")
    @classmethod
    def _args_no_nul(cls, v: list[str]) -> list[str]:
        if any("\x00" in a for a in v):
            raise ValueError("extra args may not contain NUL bytes")
        return v

    # -- derived ---------------------------------------------------------------------------------
    @property
    def gpus_needed(self) -> int:
        return gpus_for(self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size)

    @property
    def api_model_name(self) -> str:
        return self.served_model_name or self.model

    SHORT_LABEL_FIELDS: ClassVar[tuple[str, ...]] = (
        "tensor_parallel_size", "decode_context_parallel_size", "pipeline_parallel_size", "data_parallel_size",
        "enable_expert_parallel")
    """The fields `short_label` names."""

    def short_label(self) -> str:
        """`TP8`, `TP8+DCP8`, `TP4+PP2`… — the name the seed uses for a configuration."""
        return parallel_label(self.tensor_parallel_size, self.decode_context_parallel_size,
                              self.pipeline_parallel_size, self.data_parallel_size, self.enable_expert_parallel)

    def local_model_path(self) -> Path | None:
        """The model folder when the model is local (an explicit path, or one that exists)."""
        p = Path(self.model).expanduser()
        if self.model.startswith(("/", ".", "~")) or p.exists():
            return p
        return None

    # -- validation before anything starts -------------------------------------------------------
    def problems(self, host: Target | None = None) -> list[Problem]:
        """Everything wrong with this launch, each message naming the value and the fix. `host` is the
        machine it would run on; None checks the launch alone (an import, a worker elsewhere)."""
        out: list[Problem] = []
        tp, dcp = self.tensor_parallel_size, self.decode_context_parallel_size
        if tp % dcp:
            divisors = ", ".join(str(d) for d in range(1, tp + 1) if tp % d == 0)
            out.append(Problem(f"DCP size {dcp} does not divide TP size {tp}; pick one of {divisors}.",
                               "decode_context_parallel_size"))
        if host is not None:
            out += host.problems(self)
        local = self.local_model_path()
        if local is not None:
            if not local.exists():
                out.append(Problem(f"Model path {self.model} does not exist; give an existing folder or a Hugging "
                                   "Face id.", "model"))
            else:
                cfg = _model_config(local)
                out += self._context_problems(cfg)
                out += _head_problems(cfg, tp)
                kv_heads = _kv_heads(cfg)
                cpu = host is not None and host.cpu_backend
                if dcp > 1 and not cpu and kv_heads is not None and tp <= kv_heads:
                    out.append(Problem(
                        f"DCP {dcp} needs TP greater than the model's {kv_heads} KV heads (GQA/MQA), but TP is {tp}; "
                        f"raise TP above {kv_heads} or set DCP to 1.", "decode_context_parallel_size"))
        out += _repeated_flags(self.extra_args, type(self))
        if "," in self.api_model_name:
            out.append(Problem(f"Model name {self.api_model_name!r} contains a comma, which lm-eval cannot pass; "
                               "set served-model-name.", "served_model_name" if self.served_model_name else "model"))
        return out

    def _context_problems(self, cfg: dict[str, Any]) -> list[Problem]:
        """max-model-len beyond what a local model's config.json declares: vLLM refuses to start."""
        limit = _max_positions(cfg)
        if (self.max_model_len is None or limit is None or self.max_model_len <= limit
                or self.env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == "1"):
            return []
        return [Problem(f"max-model-len {self.max_model_len} exceeds the model's max_position_embeddings {limit} "
                        f"(its config.json), which vLLM refuses; set max-model-len to {limit} or less.",
                        "max_model_len")]

    def check(self, host: Target | None = None) -> LaunchSpec:
        """Raise `SpecError` listing every problem; return self when the launch can start."""
        if problems := self.problems(host):
            raise SpecError(problems)
        return self

    # -- paste a command -------------------------------------------------------------------------
    @classmethod
    def from_command(cls, command: str) -> LaunchSpec:
        """Understand a pasted `vllm serve …` line (`VAR=value` prefixes become `env`).

        vLLM's own parser reads it whenever vLLM is importable (`runner.vllm_args`): options may come
        before the model, short and prefix forms are vLLM's. Without vLLM, a simple rule stands in.
        Flags that are not spec fields go to `extra_args`, verbatim and in order.
        """
        try:
            tokens = shlex.split(command.replace("\\\n", " "), comments=False)
        except ValueError as exc:
            raise SpecError(f"Could not split the command ({exc}); check its quotes.") from None
        env: dict[str, str] = {}
        while tokens and "=" in tokens[0] and _ENV_NAME.match(tokens[0].split("=", 1)[0]):
            name, value = tokens.pop(0).split("=", 1)
            env[name] = value
        if tokens[:2] == ["vllm", "serve"]:
            tokens = tokens[2:]
        elif tokens[:1] == ["serve"]:
            tokens = tokens[1:]
        else:
            raise SpecError("A pasted command must start with `vllm serve`; e.g. `vllm serve MODEL -tp 8`.")
        from runner.vllm_args import VllmRefused, parse_serve

        fields = [n for n in cls.model_fields if n not in _NOT_FLAGS]
        try:
            parsed = parse_serve(tokens, fields)
        except VllmRefused as exc:
            raise SpecError(f"vLLM refuses this command: {exc}") from None
        if parsed is None:
            data = cls._hand_parse(tokens)
        else:
            values, extra = parsed
            data = {**values, "extra_args": extra}
            names = data.get("served_model_name")
            if isinstance(names, list):  # vLLM takes several names; servelab serves under one
                if len(names) != 1:
                    raise SpecError(f"served-model-name lists {len(names)} names; give one.")
                data["served_model_name"] = names[0]
        if "model" not in data:
            raise SpecError("No model in the command; write `vllm serve MODEL …`.")
        return cls.parse({**data, "env": env})

    @classmethod
    def _hand_parse(cls, tokens: list[str]) -> dict[str, Any]:
        """The fall-back when vLLM is not importable: the first bare word is the model, a flag takes the
        next word unless it is a spec boolean (an unknown boolean flag before the model misleads it)."""
        data: dict[str, Any] = {"extra_args": []}
        bools = {n for n, f in cls.model_fields.items() if f.annotation is bool}
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if not tok.startswith("-"):
                if "model" not in data:
                    data["model"] = tok
                else:
                    data["extra_args"].append(tok)
                i += 1
                continue
            name, eq, inline = tok.partition("=")
            field = _flag_to_field(name, cls)
            if field is None:
                data["extra_args"].append(tok)
                if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                    data["extra_args"].append(tokens[i + 1])
                    i += 1
                i += 1
                continue
            if field in bools and not eq:
                data[field] = True
                i += 1
                continue
            if eq:
                value = inline
            elif i + 1 < len(tokens):
                value, i = tokens[i + 1], i + 1
            else:
                raise SpecError(f"`{name}` needs a value; e.g. `{name} 8`.")
            data[field] = value
            i += 1
        return data


SHORT_FLAGS = {
    "-tp": "tensor_parallel_size",
    "-dcp": "decode_context_parallel_size",
    "-pp": "pipeline_parallel_size",
    "-dp": "data_parallel_size",
}
_NOT_FLAGS = {"extra_args", "env"}


def _flag_to_field(flag: str, spec: type[_Spec]) -> str | None:
    if flag in SHORT_FLAGS and spec is LaunchSpec:
        return SHORT_FLAGS[flag]
    if flag.startswith("--"):
        name = flag[2:].replace("-", "_")
        if name in spec.model_fields and name not in _NOT_FLAGS:
            return name
    return None


def _repeated_flags(extra_args: list[str], spec: type[_Spec]) -> list[Problem]:
    out = []
    for arg in extra_args:
        if arg.startswith("-"):
            field = _flag_to_field(arg.split("=", 1)[0], spec)
            if field is not None:
                out.append(Problem(
                    f"`{arg}` in extra args repeats the spec field `{field}`; "
                    f"set `{field}` instead of passing it twice.",
                    "extra_args"))
    return out


def _model_config(model_dir: Path) -> dict[str, Any]:
    """A local model's config.json (its `text_config` for multimodal models); {} when unreadable."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    return cfg if isinstance(cfg, dict) else {}


def _kv_heads(cfg: dict[str, Any]) -> int | None:
    """KV heads of a local GQA/MQA model; None for MLA models or when unknown."""
    if cfg.get("kv_lora_rank"):  # MLA (DeepSeek-V2/V3, Kimi-K2): the GQA rule does not apply
        return None
    heads = cfg.get("num_key_value_heads")
    return int(heads) if isinstance(heads, int) else None


def _head_problems(cfg: dict[str, Any], tp: int) -> list[Problem]:
    """vLLM's rules for splitting attention over TP ranks, from a local config.json: the attention heads
    divide evenly, and the KV heads either divide evenly or are replicated a whole number of times."""
    heads, kv = cfg.get("num_attention_heads"), _kv_heads(cfg)
    if not isinstance(heads, int) or heads < 1:
        return []

    def fits(t: int) -> bool:
        return heads % t == 0 and (kv is None or (kv % t == 0 if t < kv else t % kv == 0))

    if fits(tp):
        return []
    choices = [t for t in range(1, heads + 1) if fits(t)]
    shown = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}" if len(choices) > 1 else str(choices[0])
    if heads % tp:
        why = f"TP {tp} does not divide the model's {heads} attention heads (its config.json)"
    else:
        why = (f"the model's {kv} KV heads (its config.json) cannot be split over TP {tp}: vLLM needs TP to divide "
               "them or be a multiple of them")
    return [Problem(f"{why}; pick TP {shown}.", "tensor_parallel_size")]


def _max_positions(cfg: dict[str, Any]) -> int | None:
    """The context length a local model's config.json declares; None when unknown or when a RoPE
    scaling entry lets vLLM derive a longer one."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    value = cfg.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


DatasetName = Literal["random", "sharegpt", "custom", "sonnet", "hf"]
PrefixCacheState = Literal["cold", "warm", "as-is"]


class BenchSpec(_Spec):
    """How to run `vllm bench serve` against the launched server."""

    dataset_name: DatasetName = Field("random", description="Dataset: random tokens, sharegpt or custom by path.")
    dataset_path: str | None = Field(None, description="Path of the sharegpt/custom dataset file.")
    random_input_len: int = Field(1024, ge=1, le=MAX_TOKENS, description="Input tokens per request (random dataset).")
    random_output_len: int = Field(
        128, ge=1, le=MAX_TOKENS, description="Output tokens per request (random dataset).")
    request_rate: float = Field(math.inf, gt=0, description="Requests per second; inf sends all at once.")
    max_concurrency: int | None = Field(None, ge=1, le=MAX_PROMPTS, description="Most requests in flight at once.")
    num_prompts: int = Field(200, ge=1, le=MAX_PROMPTS, description="Number of requests to send.")
    burstiness: float = Field(1.0, gt=0, description="Burstiness of arrivals (1 = Poisson).")
    seed: int = Field(0, description="Random seed of the dataset and arrivals.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS, so every request has its full output.")
    percentile_metrics: str = Field("ttft,tpot,itl,e2el", description="Metrics to report percentiles for.")
    metric_percentiles: str = Field("50,90,99", description="Percentiles to report, comma separated.")
    goodput: list[str] = Field(default_factory=list, description="SLOs for goodput, e.g. ttft:500 tpot:50 (ms).")
    repeats: int = Field(1, ge=1, le=100, description="How many times to run this benchmark on the same server.")
    prefix_cache: PrefixCacheState = Field(
        "as-is",
        description="Prefix cache before each execution: cold resets it (the server then runs with "
        "VLLM_SERVER_DEV_MODE=1), warm runs the benchmark once unrecorded first, as-is leaves it.",
    )
    stop_early: bool = Field(
        True, description="In a load sweep (request-rate or max-concurrency given as a list), skip the higher "
        "loads once the server saturates: throughput up < 5 %, failed requests, or P99 TTFT > 10× the first load's."
    )
    num_warmups: int = Field(8, ge=0, le=1000, description="Warm-up requests vLLM sends before timing starts; "
                             "not measured (0: none).")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm bench serve` arguments, verbatim.")

    @field_validator("request_rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in {"inf", "infinity"}:
            return math.inf
        return v

    @field_validator("metric_percentiles")
    @classmethod
    def _percentiles(cls, v: str) -> str:
        for p in v.split(","):
            try:
                ok = 0 < float(p) < 100
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"percentile {p!r} is not a number between 0 and 100; write e.g. 50,90,99")
        return v

    def problems(self) -> list[Problem]:
        out = _repeated_flags(self.extra_args, type(self))
        if self.dataset_name in {"sharegpt", "custom"} and not self.dataset_path:
            out.append(Problem(f"Dataset {self.dataset_name} needs dataset-path; give the file or use the random "
                               "dataset.", "dataset_path"))
        if self.dataset_path and not Path(self.dataset_path).expanduser().exists():
            out.append(Problem(f"Dataset path {self.dataset_path} does not exist; give an existing file.",
                               "dataset_path"))
        return out


class EvalSpec(_Spec):
    """Accuracy check through lm-eval's `local-completions` against the running server."""

    tasks: str = Field("gsm8k", description="lm-eval task(s), comma separated.")
    num_fewshot: int = Field(5, ge=0, description="Few-shot examples per question.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N questions.")
    num_concurrent: int = Field(32, ge=1, description="Concurrent requests lm-eval sends.")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature (None: the server's default).")
    timeout: int = Field(3000, ge=1, description="Seconds lm-eval waits for one request.")
    max_retries: int = Field(3, ge=0, description="Retries of a failed request.")
    max_gen_toks: int | None = Field(None, ge=1, description="Most tokens generated per answer.")
    dataset_path: str | None = Field(
        None, description="Local JSONL with question/answer lines; replaces the hub download of GSM8K."
    )


class OutputCheckSpec(_Spec):
    """A fixed set of prompts answered greedily by every run, so two launches' answers can be compared."""

    prompts: int = Field(32, ge=1, le=1000, description="How many fixed prompts to answer.")
    max_tokens: int = Field(64, ge=1, le=4096, description="Tokens generated per answer (greedy, temperature 0).")
    seed: int = Field(0, description="Seed of the prompt set and of the requests.")


def _output_check(v: Any) -> Any:
    """`output-check: off` (or false/null) turns the check off; true or `on` keeps the defaults."""
    if v is None or v is False or (isinstance(v, str) and v.strip().lower() in {"off", "false", "no", "none"}):
        return None
    if v is True or (isinstance(v, str) and v.strip().lower() in {"on", "true", "yes"}):
        return OutputCheckSpec()
    return v


def _bench_list(v: Any) -> Any:
    """`bench:` as one mapping or a list of them (none: an empty list), load lists expanded."""
    return expand_load_lists([v] if isinstance(v, dict) else (v or []))


class RunSpec(_Spec):
    """One run: a launch, the benchmarks run against it, and an optional evaluation."""

    label: str | None = Field(None, description="Name shown in tables; defaults to e.g. TP8+DCP8.")
    launch: LaunchSpec
    bench: list[BenchSpec] = Field(default_factory=lambda: [BenchSpec()], description="Benchmarks to run.")
    eval: EvalSpec | None = Field(None, description="Accuracy evaluation (lm-eval), or none.")
    other_worker: bool = Field(
        False, description="Queued for a worker on another machine that has the GPUs this one lacks: not checked "
        "against this machine, and this machine's worker leaves it queued instead of failing it.")
    output_check: OutputCheckSpec | None = Field(
        default_factory=OutputCheckSpec,
        description="Fixed prompts answered greedily after the benchmarks, compared between runs; off to skip.",
    )

    _check_switch = field_validator("output_check", mode="before")(_output_check)
    _one_or_many = field_validator("bench", mode="before")(_bench_list)

    @property
    def display_label(self) -> str:
        return self.label or self.launch.short_label()

    def problems(self, host: Target | None = None) -> list[Problem]:
        """Every problem of the launch (on `host`, unless the run is queued for another worker), its
        benchmarks and its evaluation; fields named `launch.…`, `bench.…`."""
        out = [p.under("launch") for p in self.launch.problems(None if self.other_worker else host)]
        for b in self.bench:
            out += [p.under("bench") for p in b.problems()]
        if not self.bench and self.eval is None and self.output_check is None:
            out.append(Problem("The run has neither a benchmark nor an evaluation nor an output check; "
                               "add a bench: or eval: section."))
        return out

    def check(self, host: Target | None = None) -> RunSpec:
        if problems := self.problems(host):
            raise SpecError(problems)
        return self


class SweepSpec(_Spec):
    """A base run and lists of values; launch fields give one run per combination (each its own
    server), bench fields give several benchmarks against the same server."""

    name: str = Field("sweep", description="Sweep name.")
    label: str | None = Field(None, description="Label of the sweep's runs: each is `<label>: <its cell>`, e.g. "
                              "`kimi: TP8+DCP8`; default the sweep name.")
    launch: LaunchSpec
    bench: list[BenchSpec] = Field(default_factory=lambda: [BenchSpec()])
    eval: EvalSpec | None = None
    output_check: OutputCheckSpec | None = Field(default_factory=OutputCheckSpec)
    matrix: dict[str, list[Any]] = Field(
        default_factory=dict, description="Field → values, e.g. decode-context-parallel-size: [1, 8]."
    )
    other_worker: bool = Field(False, description="Every run queued for a worker on another machine (see RunSpec).")

    _one_or_many = field_validator("bench", mode="before")(_bench_list)
    _check_switch = field_validator("output_check", mode="before")(_output_check)

    @field_validator("matrix", mode="before")
    @classmethod
    def _matrix(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for key, values in v.items():
            name = key.replace("-", "_").removeprefix("launch.").removeprefix("bench.")
            if name not in LaunchSpec.model_fields and name not in BenchSpec.model_fields:
                raise ValueError(f"matrix key {key!r} is neither a launch nor a bench field")
            if not isinstance(values, list) or not values:
                raise ValueError(f"matrix {key!r} needs a non-empty list of values")
            out[name] = values
        return out

    def cells(self) -> list[tuple[str, RunSpec]]:
        """The runs of the sweep: (cell key, spec), one per combination of launch values."""
        launch_keys = [k for k in self.matrix if k in LaunchSpec.model_fields]
        bench_keys = [k for k in self.matrix if k not in LaunchSpec.model_fields]
        benches = []
        for combo in itertools.product(*(self.matrix[k] for k in bench_keys)):
            for base in self.bench:
                benches.append(BenchSpec.parse({**base.model_dump(), **dict(zip(bench_keys, combo))}))
        cells = []
        for combo in itertools.product(*(self.matrix[k] for k in launch_keys)):
            values = dict(zip(launch_keys, combo))
            launch = LaunchSpec.parse({**self.launch.model_dump(), **values})
            key = ",".join(f"{k}={v}" for k, v in values.items()) or "base"
            cells.append((key, RunSpec(launch=launch, bench=benches or self.bench, eval=self.eval,
                                       other_worker=self.other_worker, output_check=self.output_check)))
        return cells


class Settings(BaseSettings):
    """Process-wide settings: the only reader of servelab's environment variables (`SERVELAB_` + the name
    in each field's `validation_alias`, or + the field name). Read once at an entry point
    (`Settings.from_env()`) and passed down; README's Environment table lists the same variables."""

    model_config = SettingsConfigDict(env_prefix="SERVELAB_", env_ignore_empty=True, extra="ignore",
                                      validate_by_name=True, validate_by_alias=True)

    db: str | None = Field(None, description="Database: a path or SQLAlchemy URL; default the SQLite file "
                           "`servelab.db` in the data folder.")
    data_dir: Path = Field(Path("data"), validation_alias="SERVELAB_DATA",
                           description="Folder of run folders and the default SQLite file.")
    sample_interval_s: float = Field(1.0, gt=0, validation_alias="SERVELAB_SAMPLE_INTERVAL",
                                     description="Telemetry sampling period in seconds.")
    startup_timeout_s: float = Field(1800.0, gt=0, validation_alias="SERVELAB_STARTUP_TIMEOUT",
                                     description="Seconds to wait for vLLM's /health before a launch fails.")
    password: str | None = Field(None, description="Password that gates the dashboard.")
    backend: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="vLLM backend: auto (the CPU build when it is the only vLLM installed), gpu or cpu.")
    bench_client: bool = Field(True, description="One benchmark client process per run, importing vLLM's "
                               "benchmark code once; false: one `vllm bench serve` process per benchmark.")
    prestart_next: Literal["auto", "on", "off"] = Field(
        "auto", description="Start the next queued run's vLLM server (importing vLLM, before its arguments) and "
        "benchmark client while the run before it benchmarks, so its launch skips the import: on, off, or auto "
        "(on unless vLLM runs on the CPU backend, where the cores it would use are the ones being measured).")
    ray_address: str | None = Field(None, description="Ray cluster address (`auto`, `host:6379`): `servelab worker` "
                                    "schedules runs on the cluster's nodes instead of this machine's GPUs.")

    @classmethod
    def from_env(cls) -> Settings:
        return cls()

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name → the environment variable it is read from."""
        prefix = cls.model_config.get("env_prefix", "")
        return {name: str(f.validation_alias) if f.validation_alias else f"{prefix}{name}".upper()
                for name, f in cls.model_fields.items()}


def load_yaml_or_json(path: Path) -> dict[str, Any]:
    """Read a spec file; YAML or JSON by content."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"Cannot read spec file {path}: {exc.strerror}; check the path.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"Spec file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"Spec file {path} must hold a mapping with launch:, bench:, eval: sections.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `FIELD=VALUE` overrides (the CLI's `--set`) to a spec file's data.

    FIELD is a launch, bench or eval field named as vLLM's flag (`tensor-parallel-size`), optionally
    prefixed by its section (`bench.num-prompts`); VALUE is read as YAML (`8`, `inf`, `true`, `[1, 2]`).
    """
    import yaml

    out = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sections: dict[str, type[BaseModel]] = {"launch": LaunchSpec, "bench": BenchSpec, "eval": EvalSpec}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"`--set {item}` needs the form FIELD=VALUE, e.g. --set tensor-parallel-size=2.")
        section, _, name = key.strip().rpartition(".")
        name = name.replace("-", "_")
        if not section:
            section = next((sec for sec, model in sections.items() if name in model.model_fields), "")
        if section not in sections or name not in sections[section].model_fields:
            raise SpecError(f"`--set {key}`: no such launch, bench or eval field; `servelab fields` lists them.")
        value = yaml.safe_load(raw) if raw.strip() else None
        if section == "bench":
            benches = out.get("bench") or [{}]
            benches = [benches] if isinstance(benches, dict) else benches
            out["bench"] = [{**_underscore_keys(b), name: value} for b in benches]
        else:
            out[section] = {**_underscore_keys(out.get(section) or {}), name: value}
    return out


def load_run_spec(path: Path, overrides: list[str] | None = None) -> RunSpec:
    return RunSpec.parse(apply_overrides(load_yaml_or_json(path), overrides or []))


def load_sweep_spec(path: Path, overrides: list[str] | None = None) -> SweepSpec:
    return SweepSpec.parse(apply_overrides(load_yaml_or_json(path), overrides or []))
