"""What the Models API says of a tier's model: a deprecated one is a warning with its retirement
date, a retired or unknown one a reason for a worker to refuse to start (every call would fail)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import anthropic

from tierq.contract.tiers import Tier

__all__ = [
    "ACTIVE",
    "DEPRECATED",
    "RETIRED",
    "UNKNOWN",
    "ModelStatus",
    "ServedModel",
    "check_served_models",
    "model_status",
    "served_models",
]


#: lifecycle stages of the Models API (``ModelInfo.lifecycle``)
ACTIVE, DEPRECATED, RETIRED, UNKNOWN = "active", "deprecated", "retired", "unknown"


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """What the Models API says of one model id."""

    model: str
    #: active, deprecated, retired; ``unknown`` when the API does not know the id (404)
    lifecycle: str
    #: the scheduled retirement (deprecated models), as the API gives it
    retires_at: datetime | None = None

    @property
    def blocking(self) -> bool:
        """Whether no call to this model can succeed."""
        return self.lifecycle in (RETIRED, UNKNOWN)

    def describe(self) -> str:
        """One line for an operator."""
        if self.lifecycle == DEPRECATED:
            when = f"retires {self.retires_at:%Y-%m-%d}" if self.retires_at else "retirement not scheduled"
            return f"model {self.model} is deprecated ({when}); move the tier to a current model"
        if self.lifecycle == RETIRED:
            return f"model {self.model} is retired: every call to it fails; set the tier's model"
        if self.lifecycle == UNKNOWN:
            return f"model {self.model} is unknown to the API (404): check the tier's model id"
        return f"model {self.model} is {self.lifecycle}"


def model_status(client: anthropic.Anthropic, model: str, timeout_s: float = 5.0) -> ModelStatus:
    """Ask the Models API about ``model`` (``GET /v1/models/{id}``).

    Raises the SDK's errors other than 404 (unreachable, key rejected): the caller decides.
    """
    try:
        info = client.with_options(timeout=timeout_s, max_retries=1).models.retrieve(model)
    except anthropic.NotFoundError:
        return ModelStatus(model, UNKNOWN)
    return ModelStatus(model, info.lifecycle, info.retires_at)


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model some tiers call, and what the Models API said of it."""

    model: str
    #: the tiers that call it, as their model or their fallback
    tiers: tuple[str, ...]
    #: None: not checked (``error`` says why)
    status: ModelStatus | None
    error: str | None = None


def served_models(tiers: Iterable[Tier]) -> dict[str, list[str]]:
    """model id → the tiers that call it (their model and fallback model), in the tiers' order."""
    models: dict[str, list[str]] = {}
    for one in tiers:
        for model in (one.model, one.fallback_model):
            if model:
                models.setdefault(model, []).append(one.name)
    return models


def check_served_models(
    client: anthropic.Anthropic, tiers: Iterable[Tier], timeout_s: float = 5.0
) -> tuple[str | None, list[ServedModel]]:
    """Ask the Models API about every model ``tiers`` call.

    Returns why the Models API could not be asked at all (None when it could), and each model with
    its status; a model whose own question failed has ``status`` None and the error's name.
    """
    try:
        client.with_options(timeout=timeout_s, max_retries=1).models.list(limit=1)
    except anthropic.NotFoundError:
        return "the API at ANTHROPIC_BASE_URL serves no Models API (GET /v1/models: 404)", []
    except anthropic.APIError as exc:
        return f"cannot reach the Models API ({type(exc).__name__})", []
    served: list[ServedModel] = []
    for model, names in served_models(tiers).items():
        try:
            served.append(ServedModel(model, tuple(names), model_status(client, model, timeout_s)))
        except anthropic.APIError as exc:
            served.append(ServedModel(model, tuple(names), None, type(exc).__name__))
    return None, served
