"""How complete a sweep's record is: trials recorded, ok, failed, planned but missing, settings short
of seeds, and whether the ok trials mix code versions (:func:`poisonsweep.engine.resume.version_note`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from poisonsweep.engine import summary
from poisonsweep.engine.resume import version_note
from poisonsweep.engine.record.tables import PLAN_FILE


class RecordError(ValueError):
    """The directory holds nothing a report could be made from."""


# ---------------------------------------------------------------------------------------------
# what is recorded


@dataclass
class RecordStatus:
    """How complete the record is."""

    recorded: int
    ok: int
    failed: int
    planned: int | None = None  # None: no plan file
    partial: int = 0  # trials with rows in other tables but no trials row yet (being written, or killed)
    unplanned: int = 0  # recorded trials the latest plan does not name (an earlier run's)
    missing: pd.DataFrame = field(default_factory=pd.DataFrame)  # planned, not yet recorded
    uneven: pd.DataFrame = field(default_factory=pd.DataFrame)  # settings with fewer ok seeds than others
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)
    warned: pd.DataFrame = field(default_factory=pd.DataFrame)  # ok trials whose row holds warnings
    versions_note: str | None = None  # set when the ok trials come from more than one code version

    def lines(self) -> list[str]:
        """The status in plain sentences."""
        head = f"{self.recorded} trials recorded: {self.ok} ok, {self.failed} failed"
        if self.planned is not None:
            head += f"; {self.planned} planned, {len(self.missing)} not yet recorded"
        lines = [head + "."]
        if self.planned is None:
            lines.append(f"No {PLAN_FILE} in the directory, so trials not yet started cannot be counted.")
        if self.partial:
            lines.append(f"{self.partial} trial(s) have rows in some tables but no trials row yet (still being "
                         "written, or interrupted): they are left out.")
        if self.unplanned:
            lines.append(f"{self.unplanned} recorded trial(s) are not in the latest plan (an earlier run's); "
                         "they are included.")
        if not self.uneven.empty:
            lines.append(f"{len(self.uneven)} setting(s) have fewer ok seeds than planned or than other settings "
                         "(see 'Seeds per setting').")
        if not self.warned.empty:
            lines.append(f"{len(self.warned)} trial(s) warned (see 'Trials that warned').")
        if self.versions_note:
            lines.append(f"Warning: {self.versions_note}")
        return lines


def _setting_columns(trials: pd.DataFrame, plan: pd.DataFrame | None) -> list[str]:
    return summary.setting_columns(trials, plan)


def record_status(trials: pd.DataFrame, plan: pd.DataFrame | None, other_ids: set[str],
                  setting: list[str]) -> RecordStatus:
    """Counts of recorded, ok, failed and missing trials, and the settings short of seeds.

    ``other_ids`` are the trial ids seen in the other tables (to find half-written trials).
    """
    ok = trials[trials["status"] == "ok"]
    status = RecordStatus(recorded=len(trials), ok=len(ok), failed=len(trials) - len(ok),
                          partial=len(other_ids - set(trials["trial_id"])),
                          failures=summary.failures(trials), warned=summary.warned(trials))
    expected = trials
    if plan is not None:
        status.planned = len(plan)
        status.missing = plan[~plan["trial_id"].isin(trials["trial_id"])][setting + ["seed"]]
        status.unplanned = int((~trials["trial_id"].isin(plan["trial_id"])).sum())
        expected = pd.concat([plan, trials], ignore_index=True).drop_duplicates("trial_id")
    status.uneven = _uneven_settings(expected, ok, setting)
    status.versions_note = version_note(ok["code_version"]) if "code_version" in ok else None
    return status


def _seed_list(seeds) -> str:
    return ", ".join(str(s) for s in sorted(set(int(s) for s in seeds)))


def _uneven_settings(expected: pd.DataFrame, ok: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Settings whose ok seeds are fewer than the most any setting has (or than planned)."""
    if expected.empty:
        return pd.DataFrame(columns=setting + ["ok_seeds", "expected", "missing_seeds"])
    rows = []
    # keys as strings: a NaN in a key (e.g. n_train unset) would never compare equal
    done = {tuple(map(str, key)): group for key, group in ok.groupby(setting, dropna=False)}
    most = max((len(g) for g in done.values()), default=0)
    for key, group in expected.groupby(setting, dropna=False):
        found = done.get(tuple(map(str, key)))
        seeds_ok = found["seed"] if found is not None else pd.Series([], dtype="int64")
        wanted = max(most, group["seed"].nunique())
        if len(seeds_ok) < wanted:
            missing = set(group["seed"]) - set(seeds_ok)
            rows.append({**dict(zip(setting, key)), "ok_seeds": _seed_list(seeds_ok) or "none",
                         "expected": wanted, "missing_seeds": _seed_list(missing) or "–"})
    return pd.DataFrame(rows, columns=setting + ["ok_seeds", "expected", "missing_seeds"])
