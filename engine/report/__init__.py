"""``poisonsweep report``: tables (CSV, Markdown), figures (PNG) and one HTML page from a sweep's record.

Modules, imports flowing one way (``render`` at the top):

- ``status``: how complete the record is (recorded, ok, failed, missing, settings short of seeds);
- ``run``: what was run (sweep, code version, machines, time span, resolved config);
- ``tables``: the summary tables and their display forms;
- ``figures``: the summary figures (rates, found vs checked, unlearning);
- ``samples``: one trial per setting, its scores, and its training images rebuilt from the record;
- ``galleries``: score histograms and image galleries of those trials;
- ``render``: :func:`write_report`, the Markdown and HTML pages.

The plan file (``sweep.json``) belongs to the record: :func:`engine.record.write.write_plan`.
"""

from poisonsweep.engine.report.figures import (figure_accuracy, figure_auroc, figure_found_vs_checked,
                                               figure_unlearning, swept_keys)
from poisonsweep.engine.report.render import Report, default_report_dir, write_report
from poisonsweep.engine.report.status import RecordError, RecordStatus, record_status
from poisonsweep.engine.report.tables import (FRACTIONS_CHECKED, TOP_HARMFUL, detection_table, found_vs_checked_table,
                                  influence_table, markdown_table, unlearning_table)
from poisonsweep.engine.record.read import read_plan
from poisonsweep.engine.record.tables import PLAN_FILE
from poisonsweep.engine.record.write import write_plan

__all__ = ["FRACTIONS_CHECKED", "PLAN_FILE", "TOP_HARMFUL", "RecordError", "RecordStatus", "Report",
           "default_report_dir", "detection_table", "figure_accuracy", "figure_auroc",
           "figure_found_vs_checked", "figure_unlearning", "found_vs_checked_table", "influence_table",
           "markdown_table", "read_plan", "record_status", "swept_keys", "unlearning_table", "write_plan", "write_report"]
