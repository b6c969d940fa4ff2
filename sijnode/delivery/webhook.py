"""Triage notification: a positive result announced at once to an HTTP endpoint.

A small JSON body (study UID, pipeline, decision, probability, model version, and the
accession number only where ``delivery.webhook.include_accession_number`` allows it; no
other identifier), POSTed with the standard library and retried like a delivery.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from sijnode.delivery.outcome import AttemptResult, Outcome, classify_http_status
from sijnode.settings import WebhookSettings

#: The keys a body may hold; anything else is refused (no identifiers by accident).
BODY_KEYS = frozenset(
    {
        "study_instance_uid",
        "pipeline",
        "decision",
        "probability",
        "model_version",
        "accession_number",
        "research_use_only",
    }
)


def notification_body(
    *,
    study_instance_uid: str,
    pipeline: str,
    decision: str,
    probability: float,
    model_version: str | None,
    accession_number: str | None = None,
) -> dict[str, Any]:
    """The JSON body; ``accession_number`` is included only when given (the caller checks
    the site setting)."""
    body: dict[str, Any] = {
        "study_instance_uid": study_instance_uid,
        "pipeline": pipeline,
        "decision": decision,
        "probability": round(float(probability), 6),
        "model_version": model_version,
        "research_use_only": True,
    }
    if accession_number:
        body["accession_number"] = accession_number
    return body


def post_notification(settings: WebhookSettings, body: dict[str, Any]) -> AttemptResult:
    """POST ``body`` as JSON; 2xx delivered, 408/429/5xx or no answer transient."""
    extra = set(body) - BODY_KEYS
    if extra:
        return AttemptResult(
            Outcome.PERMANENT, error=f"expected only {sorted(BODY_KEYS)} in the body, got {extra}"
        )
    request = urllib.request.Request(
        settings.url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "sijnode"},
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_seconds) as response:
            code = int(response.status)
    except urllib.error.HTTPError as exc:
        code = int(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return AttemptResult(Outcome.TRANSIENT, error=f"webhook not reachable: {reason}")
    outcome = classify_http_status(code)
    if outcome is Outcome.DELIVERED:
        return AttemptResult(outcome, status=code)
    return AttemptResult(outcome, status=code, error=f"webhook answered HTTP {code}")
