"""A tiny random-weight Llama with a freshly trained byte-level BPE tokenizer.

Used to exercise the whole servelab pipeline (launch ``vllm serve``, benchmark,
stop) on a CPU-only machine without access to the Hugging Face hub. The weights are
random, so the generated text is gibberish; only the serving mechanics matter.

Shape: hidden 256, intermediate 512, 2 layers, 4 attention heads (head size 64, a
size vLLM's CPU attention supports), ``num_kv_heads`` KV heads, 2048 positions,
about 2000 vocabulary entries, bfloat16, safetensors.

Heavy imports (torch, transformers, tokenizers) happen inside ``write_demo_model``
so that importing this module stays cheap.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. It was the best of times, it was the worst of times; it was the age of wisdom,
it was the age of foolishness. Call me Ishmael. All happy families are alike, but every
unhappy family is unhappy in its own way. In the beginning the universe was created: this
has made a lot of people very angry and been widely regarded as a bad move!
How much wood would a woodchuck chuck, if a woodchuck could chuck wood? "Hello, world," she
said (quietly). Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14 -7 +12 50% $19.99.
Email: someone@example.com, web: https://example.org/path?q=1&x=2#top; time 12:30 [ok] {yes}
<tag> a/b c\\d e|f g~h ^caret `tick` 'quote' _under_ *star* #hash = equals.
"""

_WORDS = """\
the of and to in is was he for it with as his on be at by had are but from or have an they
which one you were her all she there would their we him been has when who will more no if out
so said what up its about into than them can only other new some could time these two may then
do first any my now such like our over man me even most made after also did many before must
through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go
came right used take three small large number system water city house school family group country
problem program question government company market service money power result reason report
server request response token model memory latency throughput cache batch prompt output input
engine worker process thread signal queue metric benchmark percentile median average maximum
minimum second minute hour morning evening night summer winter spring autumn river mountain ocean
forest garden window kitchen table chair door street village island bridge castle library
teacher student doctor farmer painter writer singer driver pilot sailor soldier king queen
apple bread cheese coffee honey lemon orange pepper rice salt sugar tea tomato butter
red blue green yellow purple black white silver golden bright dark quiet loud quick slow
happy angry brave calm clever gentle proud strange simple careful honest
run walk jump swim read write sing speak listen think learn teach build break open close
carry follow travel wonder remember forget believe explain measure compare
"""


def _corpus(seed: int) -> list[str]:
    """The built-in text plus deterministic pseudo-sentences with digits and punctuation."""
    rng = random.Random(seed)
    words = _TEXT.split() + _WORDS.split()
    punct = [".", ",", "!", "?", ";", ":", " -", "'s", "...", ")", '"']
    lines = _TEXT.splitlines()
    for _ in range(3000):
        n = rng.randint(4, 14)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        sentence = sentence[0].upper() + sentence[1:]
        if rng.random() < 0.5:
            sentence += f" {rng.randint(0, 99999)}"
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 999)}.{rng.randint(0, 99):02d}"
        lines.append(sentence + rng.choice(punct))
    return lines


def _build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_demo_model(path: Path, *, num_kv_heads: int = 2, seed: int = 0) -> Path:
    """Write the demo model into ``path`` (created if needed) and return ``path``.

    Idempotent: does nothing when ``config.json`` and ``model.safetensors`` already exist.
    Files are written to a temporary sibling directory first and moved in with
    ``config.json`` last, so a half-written directory is never mistaken for a model.
    """
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if num_kv_heads not in (1, 2, 4):
        raise ValueError(f"num_kv_heads must divide the 4 attention heads, got {num_kv_heads}")

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tokenizer = _build_tokenizer(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            dtype="bfloat16",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()  # type: ignore[arg-type]  # transformers' `to` stub
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        path.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir() if p.name != "config.json")
        for name in [*names, "config.json"]:
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def mla_config(vocab_size: int, bos: int, eos: int) -> dict:
    """A 4-layer DeepSeek-V2-shaped config: MLA attention (kv_lora_rank 512, rope head 64, the
    shapes GPU MLA kernels take) and a small MoE, for `--load-format dummy` (no weights needed)."""
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": vocab_size,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def write_mla_model(path: Path, *, seed: int = 0) -> Path:
    """Write config.json and a tokenizer of a DeepSeek-V2-shaped MLA model into ``path``.

    It has no weights: serve it with ``--load-format dummy``. Idempotent like ``write_demo_model``.
    """
    import json

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(seed)
    tokenizer.save_pretrained(path)
    config = mla_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
