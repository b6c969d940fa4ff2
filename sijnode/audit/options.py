"""The command-line options of the audit listings, declared once.

Every listing command (``audit studies``, ``jobs``, ``export``, ``summary``, ``metrics``)
takes the same filters. They are declared here, one ``Annotated`` alias per option, and
:func:`filter_options` adds them to a command: the command declares one parameter
``flt: AuditFilter`` and receives the filter built from the options. A new filter is a
field of :class:`~sijnode.audit.filters.AuditFilter`, an alias here and an entry in
:data:`FILTER_OPTIONS`; every listing then has it.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import typer

from sijnode.audit.filters import AuditFilter, parse_when
from sijnode.audit.render import OutputFormat


class Delivery(enum.StrEnum):
    """Delivery states (mirrors :class:`sijnode.db.schema.DeliveryStatus`)."""

    pending = "pending"
    retrying = "retrying"
    committing = "committing"
    delivered = "delivered"
    dead = "dead"
    shadow = "shadow"


FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="table, json or csv.")]
LimitOpt = Annotated[int, typer.Option(min=0, help="At most this many rows; 0 = all.")]

SinceOpt = Annotated[
    str | None,
    typer.Option(help="From this UTC date or date-time (ISO 8601), inclusive."),
]
UntilOpt = Annotated[
    str | None,
    typer.Option(help="Up to this UTC date (whole day included) or date-time (exclusive)."),
]
PipelineOpt = Annotated[str | None, typer.Option(help="Pipeline (ct, mr).")]
ModelOpt = Annotated[str | None, typer.Option("--model-version", help="Model version.")]
RouteOpt = Annotated[str | None, typer.Option(help="Route name.")]
StudyStateOpt = Annotated[
    str | None, typer.Option("--state", help="Study state: receiving, complete, ...")
]
JobStateOpt = Annotated[
    str | None,
    typer.Option("--state", help="Job state: queued, running, inferred, failed, ..."),
]
SenderOpt = Annotated[str | None, typer.Option(help="Calling AE title of the sender.")]
SiteOpt = Annotated[str | None, typer.Option(help="Site name.")]
DeliveryOpt = Annotated[
    Delivery | None, typer.Option("--delivery", help="Jobs with a delivery in this state.")
]
ShadowOpt = Annotated[
    bool | None, typer.Option("--shadow/--no-shadow", help="Only shadow-mode or only live jobs.")
]

#: The filter options in the order they are listed, by :class:`AuditFilter` field.
#: ``state`` is the study or the job state, chosen by :func:`filter_options`.
FILTER_OPTIONS: dict[str, Any] = {
    "since": SinceOpt,
    "until": UntilOpt,
    "pipeline": PipelineOpt,
    "model_version": ModelOpt,
    "route": RouteOpt,
    "state": None,
    "sender": SenderOpt,
    "site": SiteOpt,
    "delivery": DeliveryOpt,
    "shadow": ShadowOpt,
}

_STATE_OPTIONS: dict[str, Any] = {"study": StudyStateOpt, "job": JobStateOpt}

#: The parameter of a command that :func:`filter_options` fills.
FILTER_PARAMETER = "flt"

F = TypeVar("F", bound=Callable[..., Any])


def _check_state(value: str | None, of: Literal["study", "job"]) -> str | None:
    if value is None:
        return None
    from sijnode.db.schema import JobState, StudyState

    allowed = StudyState if of == "study" else JobState
    values = [str(m.value) for m in allowed]
    if value not in values:
        raise typer.BadParameter(
            f"expected a {of} state ({', '.join(values)}), got {value!r}", param_hint="--state"
        )
    return value


def build_filter(values: dict[str, Any], state: Literal["study", "job"] | None) -> AuditFilter:
    """The :class:`AuditFilter` of the option values (``--since``/``--until`` as given on
    the command line); a bad value is a usage error naming what was expected."""
    if state is not None:
        values["state"] = _check_state(values.get("state"), state)
    try:
        since = parse_when(values.pop("since", None))
        until = parse_when(values.pop("until", None), end=True)
        delivery = values.pop("delivery", None)
        return AuditFilter(
            since=since,
            until=until,
            delivery=None if delivery is None else delivery.value,
            **values,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def filter_options(
    *, state: Literal["study", "job"] | None = None, delivery: bool = True
) -> Callable[[F], F]:
    """Give a command the filter options in place of its ``flt: AuditFilter`` parameter.

    ``state`` adds ``--state`` for study or job states (``None``: no ``--state``);
    ``delivery=False`` leaves out ``--delivery``. The options take the place of ``flt`` in
    the command's signature, so ``--help`` lists them where ``flt`` stands.
    """
    names = [
        name
        for name in FILTER_OPTIONS
        if (name != "state" or state is not None) and (name != "delivery" or delivery)
    ]
    options = {
        name: _STATE_OPTIONS[state] if name == "state" and state else FILTER_OPTIONS[name]
        for name in names
    }

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        if FILTER_PARAMETER not in signature.parameters:
            raise TypeError(f"{command.__qualname__}: expected a parameter {FILTER_PARAMETER!r}")
        parameters: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            if param.name == FILTER_PARAMETER:
                parameters += [
                    inspect.Parameter(
                        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
                    )
                    for name, annotation in options.items()
                ]
            elif param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and param.name == "self":
                parameters.append(param)
            else:
                parameters.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        def command_with_filters(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name, None) for name in options}
            kwargs[FILTER_PARAMETER] = build_filter(values, state)
            return command(*args, **kwargs)

        command_with_filters.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters
        )
        command_with_filters.__annotations__ = {
            p.name: p.annotation for p in parameters if p.annotation is not p.empty
        }
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(command_with_filters, attribute, getattr(command, attribute))
        return command_with_filters  # type: ignore[return-value]

    return decorate
