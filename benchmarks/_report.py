"""Shared tail of the benchmark CLIs: print the report and, when asked, write it as JSON."""

import json
from pathlib import Path
from typing import Any, Optional


def emit(report: dict[str, Any], output: Optional[Path]) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
