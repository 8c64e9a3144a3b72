"""Usage history: every quota's and project's `used` over time, exact at every change, bounded in size.

Middle layer, beside `accounting.py`. Accounting writes a point (`usage_points`: time, hard, used) in the very
transaction of every change of a quota's status, so no change is ever missed, whichever process made it and
however soon the server is killed after. `roll_up` (run with every recount) folds points into buckets:

    raw points      until RAW_SECONDS old, and always each quota's newest (its spell has not ended yet)
    per minute      for MINUTE_SECONDS (two days)
    per hour        for HOUR_SECONDS (a year)

A bucket keeps the last value, the peak, and the seconds spent at the limit (used >= hard > 0, as
kubernetes-mixin's KubeQuotaFullyUsed reads it). Folding reads the points themselves, so the figures stay
exact: a spell at the limit counts in full, in the bucket where it began. `usage` answers the API with a
quota's series, its peak, its time at the limit and its refusals per day (the `refusals` table).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from vmquota import quantity
from vmquota import resources as r
from vmquota.store import Reader, Transaction, dumps

RAW_SECONDS = 120
MINUTE, HOUR = 60, 3600
MINUTE_SECONDS = 2 * 86400
HOUR_SECONDS = 366 * 86400


@dataclass
class _Bucket:
    hard: dict[str, str]
    last: dict[str, str]
    peak: dict[str, Decimal]
    at_limit: dict[str, float]

    @classmethod
    def stored(cls, hard: str, last: str, peak: str, at_limit: str) -> _Bucket:
        return cls(json.loads(hard), json.loads(last), {k: quantity.parse(v) for k, v in json.loads(peak).items()},
                   json.loads(at_limit))

    def add(self, hard: dict[str, str], used: dict[str, str], seconds: float) -> None:
        """One point, which held for `seconds`, after those already in the bucket."""
        self.hard, self.last = hard, used
        for name, text in used.items():
            value = quantity.parse(text)
            if name not in self.peak or value > self.peak[name]:
                self.peak[name] = value
        for name in at_limit(hard, used):
            self.at_limit[name] = self.at_limit.get(name, 0.0) + seconds

    def merge(self, later: _Bucket) -> None:
        self.hard, self.last = later.hard, later.last
        for name, value in later.peak.items():
            if name not in self.peak or value > self.peak[name]:
                self.peak[name] = value
        for name, seconds in later.at_limit.items():
            self.at_limit[name] = self.at_limit.get(name, 0.0) + seconds

    def columns(self) -> tuple[str, str, str, str]:
        peak = {k: quantity.format(v) for k, v in sorted(self.peak.items())}
        return (dumps(self.hard), dumps(self.last), dumps(peak),
                dumps({k: round(v, 3) for k, v in sorted(self.at_limit.items())}))


def at_limit(hard: dict[str, str], used: dict[str, str]) -> list[str]:
    """The resources whose use has reached a non-zero hard limit."""
    limits = r.parse(hard, field="hard")
    return [name for name, limit in limits.items()
            if limit > 0 and quantity.parse(used.get(name, "0")) >= limit]


def roll_up(txn: Transaction, *, now: float) -> None:
    """Fold old points into minute buckets, old minute buckets into hour buckets, and forget the oldest."""
    for kind, namespace, name in txn.quotas_with_points_before(now - RAW_SECONDS):
        _fold_points(txn, kind, namespace, name, cutoff=now - RAW_SECONDS)
    minute_cutoff = int(now - MINUTE_SECONDS) // HOUR * HOUR  # whole hours only: an hour bucket is written once
    for kind, namespace, name in txn.quotas_with_rollups_before(MINUTE, minute_cutoff):
        _fold_minutes(txn, kind, namespace, name, before=minute_cutoff)
    hour_cutoff = int(now - HOUR_SECONDS) // HOUR * HOUR
    for kind, namespace, name in txn.quotas_with_rollups_before(HOUR, hour_cutoff):
        txn.delete_rollups_before(kind, namespace, name, HOUR, hour_cutoff)
    txn.forget_refusals_before(_day(now - HOUR_SECONDS))


def _fold_points(txn: Transaction, kind: str, namespace: str, name: str, *, cutoff: float) -> None:
    points = txn.usage_points(kind, namespace, name)
    folded = [i for i in range(len(points) - 1) if points[i][1] < cutoff]  # never the newest: it still holds
    if not folded:
        return
    first_bucket = int(points[folded[0]][1]) // MINUTE * MINUTE
    buckets = {bucket: _Bucket.stored(*rest)
               for bucket, *rest in txn.usage_rollups(kind, namespace, name, MINUTE, since=first_bucket)}
    for i in folded:
        _id, at, hard, used = points[i]
        bucket = int(at) // MINUTE * MINUTE
        target = buckets.setdefault(bucket, _Bucket({}, {}, {}, {}))
        target.add(json.loads(hard), json.loads(used), max(0.0, points[i + 1][1] - at))
    for bucket, value in buckets.items():
        txn.put_rollup(kind, namespace, name, MINUTE, bucket, *value.columns())
    txn.delete_usage_points([points[i][0] for i in folded])


def _fold_minutes(txn: Transaction, kind: str, namespace: str, name: str, *, before: int) -> None:
    hours: dict[int, _Bucket] = {}
    for bucket, *rest in txn.usage_rollups(kind, namespace, name, MINUTE):
        if bucket >= before:
            break
        hour = bucket // HOUR * HOUR
        if hour not in hours:
            stored = txn.usage_rollups(kind, namespace, name, HOUR, since=hour)
            hours[hour] = _Bucket.stored(*stored[0][1:]) if stored and stored[0][0] == hour else _Bucket({}, {}, {}, {})
        hours[hour].merge(_Bucket.stored(*rest))
    for hour, value in hours.items():
        txn.put_rollup(kind, namespace, name, HOUR, hour, *value.columns())
    txn.delete_rollups_before(kind, namespace, name, MINUTE, before)


# -- reading ----------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^([0-9]+)(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | None, *, now: float) -> float:
    """The start of a window: a duration back from `now` (90m, 24h, 7d), an RFC 3339 time, or 24 h by default;
    ValueError quoting anything else."""
    if not text:
        return now - 86400
    match = _DURATION.match(text)
    if match:
        return now - int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text[:60]!r} is neither a duration (90m, 24h, 7d) nor an RFC 3339 time") from None
    if stamp.tzinfo is None:
        raise ValueError(f"{text[:60]!r} has no time zone (end it with Z or +00:00)")
    return stamp.timestamp()



def usage(reader: Reader, kind: str, namespace: str, name: str, display: str, *, since: float,
          now: float) -> dict[str, Any]:
    """A quota's history from `since`: its series (hour buckets, minute buckets, then every recent change), its
    peak, the seconds it spent at each limit, and its refusals per day."""
    series: list[dict[str, Any]] = []
    peak: dict[str, Decimal] = {}
    seconds: dict[str, float] = {}
    for resolution in (HOUR, MINUTE):
        for bucket, hard, last, peak_text, at_limit_text in reader.usage_rollups(kind, namespace, name, resolution,
                                                                                 since=int(since) // resolution
                                                                                 * resolution):
            stored = _Bucket.stored(hard, last, peak_text, at_limit_text)
            series.append({"time": _stamp(bucket), "resolution": f"{resolution}s", "hard": stored.hard,
                           "used": stored.last, "peak": _rendered(stored.peak)})
            _merge_peak(peak, stored.peak)
            for resource, value in stored.at_limit.items():
                seconds[resource] = seconds.get(resource, 0.0) + value
    points = [p for p in reader.usage_points(kind, namespace, name)]
    for i, (_id, at, hard_text, used_text) in enumerate(points):
        hard, used = json.loads(hard_text), json.loads(used_text)
        held = (points[i + 1][1] if i + 1 < len(points) else now) - at
        if at + held < since:
            continue
        series.append({"time": _stamp(at), "resolution": "change", "hard": hard, "used": used})
        _merge_peak(peak, {k: quantity.parse(v) for k, v in used.items()})
        for resource in at_limit(hard, used):
            seconds[resource] = seconds.get(resource, 0.0) + max(0.0, now - max(at, since) if i + 1 == len(points)
                                                                 else held)
    refusals: dict[str, dict[str, Any]] = {}
    for day, resource, mode, count in reader.refusals_by_day(display, namespace or None):
        if day < _day(since):
            continue
        entry = refusals.setdefault(day, {"day": day, "refused": 0, "audited": 0, "byResource": {}})
        entry["audited" if mode == "audit" else "refused"] += count
        entry["byResource"][resource] = entry["byResource"].get(resource, 0) + count
    return {"since": _stamp(since), "until": _stamp(now), "peak": _rendered(peak),
            "secondsAtLimit": {k: round(v, 3) for k, v in sorted(seconds.items())},
            "refusalsPerDay": list(refusals.values()), "series": series}


def _merge_peak(into: dict[str, Decimal], values: dict[str, Decimal]) -> None:
    for name, value in values.items():
        if name not in into or value > into[name]:
            into[name] = value


def _rendered(values: dict[str, Decimal]) -> dict[str, str]:
    return {k: quantity.format(v) for k, v in sorted(values.items())}


def _stamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")
