"""twistd plugins for llmgw, string-form so that scanning plugins imports nothing heavy."""

from twisted.application.service import ServiceMaker

llmgw = ServiceMaker(
    "llmgw",
    "llmgw.service",
    "An OpenAI-compatible gateway in front of a model server.",
    "llmgw",
)
llmgw_mock = ServiceMaker(
    "llmgw-mock",
    "llmgw.mock",
    "A stand-in OpenAI/vLLM model server for demos, tests and benchmarks.",
    "llmgw-mock",
)
