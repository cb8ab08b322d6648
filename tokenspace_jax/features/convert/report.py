"""What an import skipped and why, by feature and record, and the records it produced.

An import of thousands of features from another tool's files meets records it cannot use (text
that is lost, duplicates, malformed entries) and features it can only half use (top activations
and no negatives). None of that may pass silently, and none of it may stop the import: each is
recorded here as it happens, printed by the command and returned by the API.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Skip:
  """A record or a whole feature left out, and why (the reason names the fix)."""

  reason: str
  feature_id: Any = None
  record: str | None = None  # where the record was: a file and an index or line

  def as_dict(self) -> dict:
    out: dict = {'reason': self.reason}
    if self.feature_id is not None:
      out['feature_id'] = self.feature_id
    if self.record is not None:
      out['record'] = self.record
    return out


@dataclasses.dataclass
class Report:
  """Counts, skips and warnings of one import; filled in while its records are produced."""

  format: str
  records: int = 0
  features: int = 0
  skipped: list[Skip] = dataclasses.field(default_factory=list)
  warnings: list[Skip] = dataclasses.field(default_factory=list)  # kept, but with a caveat

  def skip(self, reason: str, feature_id: Any = None, record: str | None = None) -> None:
    self.skipped.append(Skip(reason, feature_id, record))

  def warn(self, reason: str, feature_id: Any = None) -> None:
    self.warnings.append(Skip(reason, feature_id))

  def as_dict(self) -> dict:
    return {'format': self.format, 'records': self.records, 'features': self.features,
            'skipped': [s.as_dict() for s in self.skipped],
            'warnings': [w.as_dict() for w in self.warnings]}

  def summary(self, limit: int = 10) -> str:
    """A few lines for a terminal: counts, then the first ``limit`` skips and warnings."""
    lines = [f'{self.format}: {self.records} records of {self.features} features.']
    for title, items in (('skipped', self.skipped), ('warning', self.warnings)):
      if not items:
        continue
      lines.append(f'{len(items)} {title}{"s" if title == "warning" and len(items) > 1 else ""}:')
      for item in items[:limit]:
        who = ', '.join(p for p in (
            f'feature {item.feature_id!r}' if item.feature_id is not None else '',
            item.record or '') if p)
        lines.append(f'  {who}: {item.reason}' if who else f'  {item.reason}')
      if len(items) > limit:
        lines.append(f'  ... and {len(items) - limit} more (all of them: --report=FILE, or '
                     'the returned report).')
    return '\n'.join(lines)


class Conversion:
  """The records of one import, produced while iterated (once), with its :class:`Report`.

  ``produce(report)`` yields record dicts and notes what it skips in ``report``; this class
  counts what comes out, so every importer reports the same way.
  """

  def __init__(self, fmt: str, produce: Callable[[Report], Iterator[dict]]):
    self.report = Report(fmt)
    self._produce = produce
    self._used = False

  def __iter__(self) -> Iterator[dict]:
    if self._used:
      raise RuntimeError('A Conversion can be iterated once; call the importer again.')
    self._used = True
    seen = set()
    for rec in self._produce(self.report):
      self.report.records += 1
      fid = (type(rec['feature_id']).__name__, rec['feature_id'])
      if fid not in seen:
        seen.add(fid)
        self.report.features += 1
      yield rec


def write_records(records: Conversion, path: str) -> Report:
  """Writes the records to ``path`` as JSON Lines (whole or not at all); returns the report."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      for rec in records:
        f.write(json.dumps(rec, ensure_ascii=False) + '\n')
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return records.report
