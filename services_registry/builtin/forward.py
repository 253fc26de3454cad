"""Forward: send a received series on to DICOM peers chosen by rules on its headers.

Enable it with the rules as a param::

    dcmflow services enable forward -p 'rules=[
        {"peer": "PACS", "modality": ["CT", "MR"]},
        {"peer": "RESEARCH", "calling_ae": "SCANNER1", "description": "(?i)t1|flair"}]'

A rule matches when every condition it names holds: ``modality`` (one or a list),
``calling_ae`` (one or a list: the AE that sent the series, ``headers['callingAE']``) and
``description`` (a regular expression searched in SeriesDescription). Each peer must be
known to dcmflow (``Peer`` records: AE title, host, port, TLS). The callback picks the peers
in the flow, so ``dcmflow services plan`` shows why a series would or would not be sent; the
worker only names the series folder with dcm-processor's ``storage`` key, and dcmflow's
sender does the C-STOREs with retries and records what was sent where (session data
``sent``), as for any job's DICOM outputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from services_registry import Service

__all__ = ["service", "forward", "choose_peers", "matching_peers"]

service = Service("forward", description="Send each series to DICOM peers chosen by rules on its headers")


def _as_set(value: Any) -> set[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    return {str(v).strip().upper() for v in values}


def _rule_matches(rule: Mapping[str, Any], headers: Mapping[str, Any]) -> bool:
    modalities = _as_set(rule.get("modality"))
    if modalities is not None and str(headers.get("Modality", "")).upper() not in modalities:
        return False
    callers = _as_set(rule.get("calling_ae"))
    if callers is not None and str(headers.get("callingAE", "")).strip().upper() not in callers:
        return False
    pattern = rule.get("description")
    if pattern is not None and re.search(str(pattern), str(headers.get("SeriesDescription", ""))) is None:
        return False
    return True


def matching_peers(rules: Sequence[Mapping[str, Any]], headers: Mapping[str, Any]) -> list[str]:
    """Peers of every rule that matches ``headers``, each once, in rule order.

    Raises
    ------
    ValueError
        A rule without a ``peer``, or with a description that is not a regular expression.
    """
    peers: list[str] = []
    for number, rule in enumerate(rules, 1):
        if not isinstance(rule, Mapping) or not rule.get("peer"):
            raise ValueError(f"forward rule {number} names no peer: {rule!r}")
        try:
            matched = _rule_matches(rule, headers)
        except re.error as exc:
            raise ValueError(f"forward rule {number}: description is not a regular expression: {exc}") from None
        if matched and str(rule["peer"]) not in peers:
            peers.append(str(rule["peer"]))
    return peers


@service.job(
    name="forward",
    timeout="30m",
    sort_position=90,
    params={"rules": []},
    description="Send the series to the peers whose rules match it",
)
def forward(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Ask dcmflow to send the series' folder to each chosen peer (dcm-processor ``storage`` key)."""
    peers = list(added_params.get(jobName, {}).get("peers", []))
    print(f"forwarding {headers['dcmpath']} to {', '.join(peers)}")
    return {
        "peers": peers,
        "storage": [{"type": "dicom", "path": headers["dcmpath"], "destination": peer} for peer in peers],
    }


@forward.callback
def choose_peers(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Select the job when a rule matches; tell the worker which peers, or say why not."""
    rules = (params or {}).get("rules") or []
    if not rules:
        return False, {"reason": "no forward rules; set them with `dcmflow services enable forward -p rules=...`"}
    peers = matching_peers(rules, headers)
    if not peers:
        return False, {"reason": f"no rule matches modality {headers.get('Modality')!r}, caller {headers.get('callingAE')!r}"}
    return True, {"peers": peers}
