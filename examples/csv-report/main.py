"""csv-report: totals per region, written as files to the output directory."""

import csv
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

#: Files written here come back with the run's result (``$STREAMSVC_OUTPUT_DIR``).
OUTPUT_DIR = Path(os.environ.get("STREAMSVC_OUTPUT_DIR", "/work/out"))


def run(context: dict[str, Any]) -> dict[str, Any]:
    totals: defaultdict[str, float] = defaultdict(float)
    for sale in context["connector"]["configuration"]["sales"]:
        totals[sale["region"]] += float(sale["amount"])
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUTPUT_DIR / "report.csv", "w", newline="") as report:
        writer = csv.writer(report)
        writer.writerow(["region", "total"])
        for region in sorted(totals):
            writer.writerow([region, f"{totals[region]:.2f}"])
    summary = {"regions": len(totals), "total": round(sum(totals.values()), 2)}
    (OUTPUT_DIR / "summary.json").write_text(json.dumps(summary))
    print(f"{len(totals)} regions written to report.csv")
    return summary
