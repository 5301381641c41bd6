"""The vLLM names the embedded backend uses, imported once, off the event loop (the import takes seconds)."""

from __future__ import annotations

import os
from typing import Any


class VLLMNames:
    """Attribute access to the vLLM classes and constants we use; vLLM is untyped, hence ``Any``."""

    def __init__(self) -> None:
        # vLLM phones home unless told not to; an appliance must not.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        import vllm
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMClientError
        from vllm.lora.request import LoRARequest
        from vllm.parser import ParserManager
        from vllm.parser.abstract_parser import DelegatingParser
        from vllm.platforms import current_platform
        from vllm.reasoning import ReasoningParserManager
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.tool_parsers import ToolParser, ToolParserManager
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError

        self.__version__: str = vllm.__version__
        self.on_cpu: bool = current_platform.is_cpu()
        self.AsyncEngineArgs: Any = AsyncEngineArgs
        self.AsyncLLM: Any = AsyncLLM
        self.StructuredOutputsConfig: Any = StructuredOutputsConfig
        self.SamplingParams: Any = vllm.SamplingParams
        self.PoolingParams: Any = vllm.PoolingParams
        self.TokensPrompt: Any = vllm.TokensPrompt
        self.StructuredOutputsParams: Any = StructuredOutputsParams
        self.LoRARequest: Any = LoRARequest
        self.DELTA: Any = RequestOutputKind.DELTA
        self.FINAL_ONLY: Any = RequestOutputKind.FINAL_ONLY
        self.VLLMClientError: Any = VLLMClientError
        self.EngineDeadError: Any = EngineDeadError
        # The parsers' own request type: vLLM's parsers read tools and tool_choice from it.
        self.ChatCompletionRequest: Any = ChatCompletionRequest
        self.ParserManager: Any = ParserManager
        self.DelegatingParser: Any = DelegatingParser
        self.ToolParser: Any = ToolParser
        self.ToolParserManager: Any = ToolParserManager
        self.ReasoningParserManager: Any = ReasoningParserManager


def import_vllm() -> VLLMNames:
    return VLLMNames()
