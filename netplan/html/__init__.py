"""HTML reports: one self-contained page per report (Jinja2 templates, plotly charts, plotly.js
inlined, nothing fetched), built from a report's versioned JSON. `page` is the shell every report
shares; `topomap` draws the topology; `analysis` is `netplan analyze --html`; `whatif` is
`netplan whatif --html`. (benchmarks/html_report.py builds the benchmarks page on `page`.)

Imported only when a page is asked for: `netplan analyze` without --html never loads plotly or
Jinja2.
"""

from netplan.html.analysis import analysis_page
from netplan.html.whatif import whatif_page

__all__ = ["analysis_page", "whatif_page"]
