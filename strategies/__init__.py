"""Strategy adapters (installed as `tfpar.strategies`) and their registry."""

from typing import Dict, Type

from tfpar import checks
from tfpar import config as config_lib
from tfpar.strategies.base import StrategyAdapter
from tfpar.strategies.default import DefaultAdapter
from tfpar.strategies.dtensor import DTensorAdapter
from tfpar.strategies.mirrored import MirroredAdapter
from tfpar.strategies.multi_worker import MultiWorkerAdapter
from tfpar.strategies.pipeline import PipelineAdapter

_REGISTRY: Dict[str, Type[StrategyAdapter]] = {
    DefaultAdapter.name: DefaultAdapter,
    MirroredAdapter.name: MirroredAdapter,
    DTensorAdapter.name: DTensorAdapter,
    MultiWorkerAdapter.name: MultiWorkerAdapter,
    PipelineAdapter.name: PipelineAdapter,
}


def register(adapter_cls: Type[StrategyAdapter]) -> Type[StrategyAdapter]:
    """Adds an adapter class to the registry under `adapter_cls.name`."""
    _REGISTRY[adapter_cls.name] = adapter_cls
    return adapter_cls


def names():
    return tuple(_REGISTRY)


def check_name(name: str) -> None:
    """Raises ValueError for a strategy name that is not registered."""
    if name in config_lib.STRATEGIES and name not in _REGISTRY:
        raise ValueError(
            f"--strategy={name} is not available yet in this version of tfpar. "
            f"Received: strategy={name!r}; available: {', '.join(_REGISTRY)}.")
    checks.choice("strategy", name, tuple(_REGISTRY))


def get(name: str, **options) -> StrategyAdapter:
    """Creates the adapter registered as `name` with keyword `options`.

    Raises:
      ValueError: for a name that is not registered (the message lists them).
    """
    check_name(name)
    return _REGISTRY[name](**options)


def from_config(parallel: config_lib.ParallelConfig) -> StrategyAdapter:
    """Creates the adapter that `parallel.strategy` names, with its options."""
    check_name(parallel.strategy)
    return _REGISTRY[parallel.strategy].from_config(parallel)


__all__ = ["from_config", "StrategyAdapter", "DefaultAdapter", "MirroredAdapter", "get", "names", "register"]
