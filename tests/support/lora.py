"""LoRA adapters for the tiny demo model, made locally with peft: no download, deterministic.

``python -m tests.support.lora --model DIR --output DIR [--rank R] [--seed S]`` builds one, and
``python -m tests.support.lora --model DIR --adapter DIR --reference IDS`` prints what transformers and peft
compute for a prompt, with and without the adapter. Both run in a subprocess, so torch and peft stay out of
the test process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import REPO_ROOT

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEED = 4321


def build_lora_adapter(model_dir: Path, output: Path, *, rank: int = 8, seed: int = SEED) -> Path:
    """Save an adapter of ``rank`` for the model in ``model_dir`` into ``output`` (in a subprocess)."""
    subprocess.run(
        [sys.executable, "-m", "tests.support.lora", "--model", str(model_dir), "--output", str(output),
         "--rank", str(rank), "--seed", str(seed)],
        cwd=REPO_ROOT, check=True, timeout=300, capture_output=True,
    )
    return output


def reference_logprobs(model_dir: Path, adapter_dir: Path, prompt_ids: Sequence[int]) -> dict[str, list[Any]]:
    """transformers' next-token log-probabilities after ``prompt_ids`` (float32), without ("base") and with
    ("lora") the adapter, by token id; "tokens" holds each id decoded alone."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.lora", "--model", str(model_dir), "--adapter", str(adapter_dir),
         "--reference", ",".join(map(str, prompt_ids))],
        cwd=REPO_ROOT, check=True, timeout=300, capture_output=True, text=True,
    )
    result: dict[str, list[Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="session")
def demo_lora_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 adapter of the demo model whose non-zero weights change what the model generates."""
    return build_lora_adapter(demo_model_dir, tmp_path_factory.mktemp("loras") / "tiny-lora")


def _build(model_dir: Path, output: Path, rank: int, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # init_lora_weights=False keeps both A and B random (peft's default zeroes B): the adapter changes outputs.
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(output), safe_serialization=True)
    if not (output / "adapter_config.json").is_file():
        raise RuntimeError(f"peft wrote no adapter_config.json into {output}")


def _reference(model_dir: Path, adapter_dir: Path, prompt_ids: list[int]) -> dict[str, list[Any]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = torch.tensor([prompt_ids])
    result: dict[str, list[Any]] = {"tokens": [tokenizer.decode([i]) for i in range(len(tokenizer))]}
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        result["base"] = torch.log_softmax(model(prompt).logits[0, -1], -1).tolist()
        adapted = PeftModel.from_pretrained(model, str(adapter_dir))
        result["lora"] = torch.log_softmax(adapted(prompt).logits[0, -1], -1).tolist()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--output", type=Path, help="where to save a new adapter")
    parser.add_argument("--adapter", type=Path, help="with --reference: the adapter to compare")
    parser.add_argument("--reference", help="comma-separated prompt token ids: print reference log-probabilities")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    if args.reference is not None:
        if args.adapter is None:
            parser.error("--reference needs --adapter")
        ids = [int(i) for i in args.reference.split(",")]
        print(json.dumps(_reference(args.model, args.adapter, ids)))
    elif args.output is not None:
        _build(args.model, args.output, args.rank, args.seed)
    else:
        parser.error("give --output (build an adapter) or --reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
