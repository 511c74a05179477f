"""The CDI audit service: HTTP API, storage and operator commands (see docs/service.md).

The API process imports nothing that loads torch; :mod:`worker` runs the audits.
"""

__version__ = "0.1.0"
