"""Build "helios-demo-tiny": a small random-weight Llama model for tests and demos.

The embedded vLLM backend needs a real Hugging Face model directory, but the
deployment and CI machines cannot reach the Hugging Face hub. This module creates
one from nothing: a Llama-architecture config, weights drawn from a fixed seed,
a byte-level BPE tokenizer trained on a built-in corpus, a chat template that
understands tools, and a generation config whose EOS matches the tokenizer.

The output is deterministic, so two builds with the same seed are byte-identical
in their weights and tokenizer; the model generates gibberish, which is all the
gateway needs to exercise the whole serving path.

Usage::

    python -m app.demo_model --output models/helios-demo-tiny

torch, transformers and tokenizers are imported lazily, inside functions: the
gateway imports this module for its constants and must keep working in
environments without the heavy ML stack installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from tokenizers import Tokenizer
    from transformers import LlamaConfig, PreTrainedTokenizerBase

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_SEED",
    "EOS_TOKEN",
    "MARKER_FILE",
    "BuildResult",
    "build_demo_model",
    "is_complete",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME: Final = "helios-demo-tiny"
DEFAULT_SEED: Final = 1234

# Bumped whenever the recipe changes, so that a directory built by an older
# recipe is not mistaken for a complete current one.
RECIPE_VERSION: Final = 2

MARKER_FILE: Final = "helios-demo-model.json"

BOS_TOKEN: Final = "<s>"
EOS_TOKEN: Final = "</s>"
PAD_TOKEN: Final = "<pad>"
UNK_TOKEN: Final = "<unk>"
ROLE_TOKENS: Final = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
# Markup that vLLM's parsers look up by token id (hermes tool calls, deepseek_r1/qwen3 reasoning). They are
# ordinary (non-special) added tokens, as in the models those parsers are for, so they stay in decoded text.
MARKUP_TOKENS: Final = ("<think>", "</think>", "<tool_call>", "</tool_call>")
# The order fixes the ids: pad=0, bos=1, eos=2, unk=3, then the role markers.
SPECIAL_TOKENS: Final = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)

TARGET_VOCAB_SIZE: Final = 2048
HIDDEN_SIZE: Final = 256
INTERMEDIATE_SIZE: Final = 512
NUM_LAYERS: Final = 2
NUM_ATTENTION_HEADS: Final = 4
NUM_KV_HEADS: Final = 2
MAX_POSITION_EMBEDDINGS: Final = 2048
INITIALIZER_RANGE: Final = 0.02
# bfloat16 halves the files and is what vLLM's CPU backend prefers.
TORCH_DTYPE: Final = "bfloat16"

MODEL_FILES: Final = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Every turn ends with EOS so that the engine's default stop condition (EOS)
# also ends an assistant turn; role markers are single special tokens so that
# they are never split and are dropped by skip_special_tokens. Content may be a
# string or a list of OpenAI content parts, since callers pass both shapes.
CHAT_TEMPLATE: Final = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '<|system|>\\nYou can call the following tools. To call one, reply with "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>.\\n\' -}}'
    "{%- for tool in tools -%}"
    "{{- (tool | tojson) + '\\n' -}}"
    "{%- endfor -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if message['content'] or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -%}"
    "{{- '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' + args + '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- endif -%}"
)

_BASE_CORPUS: Final = (
    (
        "Helios Serve is a gateway that speaks the OpenAI API and routes each request "
        "to a remote provider or to a model running inside the process."
    ),
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    (
        "A language model predicts the next token from the tokens before it; sampling "
        "with a temperature, top_p and top_k turns those predictions into text."
    ),
    "Hello! How can I help you today? I am a helpful assistant. Please answer briefly.",
    "What is the weather like in Paris, Berlin, Tokyo, Madrid, Rome, Oslo and Lima?",
    "The user asked a question and the assistant answered it with a short, clear reply.",
    'Call the tool get_weather with {"city": "Paris", "unit": "celsius"} and report it.',
    '{"name": "get_weather", "arguments": {"location": "Boston", "days": 3}}',
    '{"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}}}',
    "def handler(request):\n    return {'status': 200, 'body': request.json()}\n",
    "for i in range(10):\n    print(i * i, end=', ')\n",
    "SELECT id, name, created_at FROM users WHERE active = true ORDER BY id LIMIT 10;",
    (
        "Streaming responses are sent as server-sent events, one data line per chunk, "
        "and the stream ends with data: [DONE]."
    ),
    "Errors carry a message, a type, a parameter and a code, with a matching HTTP status.",
    (
        "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March "
        "April May June July August September October November December."
    ),
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 512 1024 2048 3.14 2.718 -1 1e-5.",
    "Punctuation and symbols: ( ) [ ] { } < > , . ; : ! ? ' \" / \\ | @ # $ % ^ & * - + = ~ `",
    "Une phrase en français, ein Satz auf Deutsch, una frase en español, 日本語の文.",
)

_WORD_LINES: Final = (
    "model token request response stream chunk server client engine cache memory",
    "prompt completion chat message system user assistant tool function argument",
    "value string number object array boolean null true false error status health",
    "ready metric latency throughput batch queue schedule worker thread process",
    "config setting option default timeout retry limit rate key secret header body",
    "json schema field type name id index choice finish reason stop length usage",
    "input output text data time date city country weather temperature sun rain",
    "snow wind cloud river mountain ocean forest garden house road bridge tower",
    "red green blue yellow black white small large fast slow new old good bad",
    "first second third last next previous open close start end begin finish",
)


def _corpus() -> Iterator[str]:
    """Yield the training text: fixed prose plus deterministic word combinations.

    The combinations exist to give the BPE trainer enough distinct pairs to reach
    the target vocabulary; they are generated arithmetically rather than with a
    random generator so that no library version can change them.
    """
    yield from _BASE_CORPUS
    vocabulary = [word for line in _WORD_LINES for word in line.split()]
    count = len(vocabulary)
    for i in range(count):
        for step in (1, 3, 7, 11):
            words = [vocabulary[(i + k * step) % count] for k in range(8)]
            sentence = " ".join(words)
            yield sentence.capitalize() + "."
            yield f"{words[0]}_{words[1]} = {i * step}; {words[2].upper()} {i}/{step}"


def _train_tokenizer() -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # Seeding the full byte alphabet means any UTF-8 input is encodable,
        # even bytes that never occur in the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Like Llama: plain encode() prepends BOS, while the chat template writes BOS
    # itself and is encoded with add_special_tokens=False.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tokenizer


def _wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _make_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        # The exact tokenizer size, so that no sampled id lacks a token.
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_ATTENTION_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=TORCH_DTYPE,
        architectures=["LlamaForCausalLM"],
    )


def _save_model(config: LlamaConfig, directory: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Weights are re-drawn explicitly, in sorted parameter order from a private
    # generator, so they do not depend on how a transformers release orders or
    # implements its own initialisation.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, INITIALIZER_RANGE, generator=generator)
                param.copy_(values)
    model = model.to(getattr(torch, TORCH_DTYPE))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(directory, safe_serialization=True)


def _current_umask() -> int:
    # os.umask can only be read by setting it, so set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(directory: Path, seed: int = DEFAULT_SEED) -> bool:
    """Tell whether ``directory`` holds a finished build of this recipe and seed."""
    marker = _read_marker(directory)
    if marker is None:
        return False
    if marker.get("recipe_version") != RECIPE_VERSION or marker.get("seed") != seed:
        return False
    if not all((directory / name).is_file() for name in MODEL_FILES):
        return False
    # transformers 5 saves the template beside tokenizer_config.json, older
    # releases inside it; either place counts.
    if (directory / "chat_template.jinja").is_file():
        return True
    try:
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and "chat_template" in tokenizer_config


@dataclass(frozen=True, slots=True)
class BuildResult:
    """Where the model is and whether this call had to build it."""

    path: Path
    built: bool


def build_demo_model(
    output: Path,
    *,
    force: bool = False,
    seed: int = DEFAULT_SEED,
    name: str = DEFAULT_MODEL_NAME,
) -> BuildResult:
    """Build the demo model into ``output`` unless a complete build is already there.

    Files are written to a temporary sibling directory and moved in afterwards,
    with the marker last, so an interrupted build never looks complete.
    """
    output = output.expanduser().resolve()
    if not force and is_complete(output, seed):
        logger.info("demo model already present at %s", output)
        return BuildResult(path=output, built=False)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tokenizer = _wrap_tokenizer(_train_tokenizer())
        config = _make_config(tokenizer)
        _save_model(config, staging, seed)
        tokenizer.save_pretrained(staging)

        output.mkdir(exist_ok=True)
        (output / MARKER_FILE).unlink(missing_ok=True)
        for item in sorted(staging.iterdir()):
            target = output / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            item.replace(target)
            if target.is_file():
                # mkstemp-style 0600 files would be unreadable to a server that
                # runs as another user (e.g. a container volume).
                target.chmod(0o644 & ~_current_umask())
        marker = {
            "name": name,
            "recipe_version": RECIPE_VERSION,
            "seed": seed,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        }
        (output / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    logger.info("built demo model %r at %s", name, output)
    return BuildResult(path=output, built=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.demo_model",
        description=f"Build the tiny random-weight '{DEFAULT_MODEL_NAME}' Llama model offline.",
    )
    parser.add_argument("--output", type=Path, required=True, help="model directory to create")
    parser.add_argument("--force", action="store_true", help="rebuild even if already complete")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="weight initialisation seed")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="name recorded in the marker")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the model directory on success."""
    args = _parse_args(argv)
    # The builder needs no network; offline mode turns any accidental hub
    # access into an immediate error instead of a long timeout. Only the CLI
    # sets it, because build_demo_model() must not change a host process's env.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = build_demo_model(args.output, force=args.force, seed=args.seed, name=args.name)
    except ImportError as exc:
        logger.error("building the demo model needs torch, transformers and tokenizers: %s", exc)
        return 2
    print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
