"""The server-rendered web UI: Jinja2 pages, htmx fragments, SSE and uPlot (docs/ui.md)."""
