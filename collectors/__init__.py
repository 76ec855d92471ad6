"""Data sources of gpucap: one module per source, none importing `agent`."""
