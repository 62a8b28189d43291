"""Generation engine (dynamic and static) for every supported family."""

from llm.infer.engine import Engine, Runner, create_engine
from llm.infer.sampling import GenerationConfig
from llm.infer.static import export_engine, load_static_engine

__all__ = ["Engine", "GenerationConfig", "Runner", "create_engine", "export_engine", "load_static_engine"]
